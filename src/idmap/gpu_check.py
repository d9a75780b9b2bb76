"""One prepared command for a GPU window: every question the first GPU session must answer, in one call.

    idmap-gpu-check [--budget SECONDS] [--out DIR] [--data JPEG_ROOT] [--rehearse]

Steps, in order, each in a time cap of its own: machine, tests, smoke, resume, bench, packing,
fused, fidelity, long (docs/benchmarks.md says what each measures). A step whose code can hang or
crash CUDA runs in a child process killed at its cap, so a bad step costs one row, not the window;
every step writes a row ("failed: reason", "skipped: needs CUDA"). The bundle under --out is three
files, rewritten after every step so that a call cut short still brings back what it has:
summary.md (the table, printed last on stdout too), results.json (every number) and logs.tar.gz.

--rehearse runs every step on the CPU at tiny sizes through the same code, so the command cannot
rot before a GPU arrives (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from idmap import gpu_check_runs as runs, gpu_check_steps as steps, paths
from idmap.gpu_check_runs import last_line, run_logged
from idmap.gpu_check_sizes import GPU, REHEARSAL, Sizes
from idmap.rundir import atomic_write, write_json

SUMMARY_MD, RESULTS_JSON, LOGS_TAR = "summary.md", "results.json", "logs.tar.gz"
LOG_TAIL = 2 * 2**20  # bytes of each log kept in the bundle (its end: where failures are)
MARGIN_S = 5.0  # kept back from the budget for writing the bundle


@dataclass(frozen=True)
class Step:
    name: str
    weight: float  # its share of the budget left when it starts (shares of later steps count too)
    run: object  # fn(ctx)
    child: bool  # run in a child process (CUDA work that may hang or crash)


STEPS = (
    Step("machine", 3, steps.machine, True),
    Step("tests", 10, runs.tests, False),
    Step("smoke", 27, steps.smoke, True),
    Step("resume", 7, steps.resume, True),
    Step("bench", 20, runs.bench, False),
    Step("packing", 12, runs.packing, False),
    Step("fused", 5, steps.fused, True),
    Step("fidelity", 12, runs.fidelity, False),
    Step("long", 4, runs.long_runs, False),
)
CHILD_STEPS = {s.name: s.run for s in STEPS if s.child} | {"ghost_bn": steps.ghost_bn,
                                                          "jpeg_cache": steps.jpeg_cache}


@dataclass
class Context:
    """What a step gets: its sizes, its deadline, where to work, and `add` for its rows."""

    sizes: Sizes
    rehearse: bool
    work: Path
    deadline: float  # time.time() by which the step must be done
    data: str | None  # root of the unpacked JPEG copy of CIFAR-10
    long_dir: Path
    items: list[dict] = field(default_factory=list)
    headline: str = ""
    record: Path | None = None  # a child's items file, rewritten after every row
    extra_logs: list[Path] = field(default_factory=list)  # logs outside `work` for the bundle

    @property
    def cuda(self) -> bool:
        return not self.rehearse

    def left(self) -> float:
        return self.deadline - time.time()

    def add(self, name: str, status: str = "ok", **numbers) -> dict:
        item = {"name": name, "status": status, **numbers}
        self.items.append(item)
        if self.record:
            write_json(self.record, {"items": self.items, "headline": self.headline})
        return item

    def log_path(self, name: str) -> Path:
        path = self.work / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def child(self, name: str, deadline: float | None = None) -> list[dict]:
        """Runs step `name` in a child process killed at `deadline`; its rows, a failure row added
        when it timed out or crashed."""
        deadline = min(deadline or self.deadline, self.deadline)
        record = self.work / f"{name}.json"
        record.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "idmap.gpu_check", "--child", name, "--work", str(self.work),
               "--deadline", str(deadline), "--long-dir", str(self.long_dir)]
        cmd += ["--rehearse"] if self.rehearse else []
        cmd += ["--data", self.data] if self.data else []
        t0 = time.time()
        rc = run_logged(cmd, self.log_path(name), deadline)
        got = json.loads(record.read_text()) if record.exists() else {"items": [], "headline": ""}
        items = got["items"]
        self.headline = self.headline or got["headline"]
        if rc is None:
            items.append({"name": name, "status": f"failed: timed out after {time.time() - t0:.0f} s "
                                                  f"({len(items)} rows done)"})
        elif rc:
            items.append({"name": name, "status": f"failed: exit {rc}: {last_line(self.log_path(name))}"})
        self.items += items
        return items


# --------------------------------------------------------------------------------------------------
# Rows and the bundle
# --------------------------------------------------------------------------------------------------
def verdict(items: list[dict]) -> str:
    """A step's result from its rows: the first failure named, else how many ran and were skipped."""
    failed = [i for i in items if i["status"].startswith("failed")]
    skipped = [i for i in items if i["status"].startswith("skipped")]
    if failed:
        first = failed[0]
        return f"failed: {len(failed)} of {len(items)} ({first['name']}: {first['status'][8:]})"
    if not items:
        return "failed: no rows"
    if len(skipped) == len(items):
        return skipped[0]["status"]
    return f"ok ({len(items) - len(skipped)} ran" + (f", {len(skipped)} skipped)" if skipped else ")")


def cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def number_text(item: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in item.items() if k not in ("name", "status") and v is not None)


def markdown(report: dict) -> tuple[str, str]:
    """(the short table, the whole summary: the table then each step's rows)."""
    table = ["| step | result | seconds | headline |", "|---|---|---|---|"]
    table += [f"| {r['step']} | {cell(r['status'])} | {r['seconds']:.0f} | {cell(r['headline'])} |"
              for r in report["steps"]]
    head = [f"# idmap GPU check{' (rehearsal on a CPU: no GPU numbers)' if report['rehearse'] else ''}", "",
            f"{report['when']}; budget {report['budget_s']:.0f} s; command `{report['command']}`", "", ""]
    details = []
    for r in report["steps"]:
        details += ["", f"## {r['step']}", "", "| row | status | numbers |", "|---|---|---|"]
        details += [f"| {cell(i['name'])} | {cell(i['status'])} | {cell(number_text(i))} |" for i in r["items"]]
    short = "\n".join(table) + "\n"
    return short, "\n".join(head) + short + "\n".join(details) + "\n"


def write_bundle(out: Path, report: dict, work: Path, extra_logs: list[Path]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    short, text = markdown(report)
    atomic_write(out / SUMMARY_MD, lambda f: f.write(text), mode="w")
    write_json(out / RESULTS_JSON, report)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        logs = sorted((work / "logs").glob("*.log")) + [p for p in extra_logs if p.is_file()]
        for path in logs:
            data = path.read_bytes()[-LOG_TAIL:]
            info = tarfile.TarInfo(f"logs/{path.parent.name}-{path.name}" if path in extra_logs
                                   else f"logs/{path.name}")
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
    atomic_write(out / LOGS_TAR, lambda f: f.write(buffer.getvalue()))
    return short


def cap(budget_end: float, index: int) -> float:
    """Step `index`'s deadline: its weight's share of the time left, so time a step leaves unused
    goes to the steps after it; the last step gets all that is left."""
    left = budget_end - time.time()
    weights = [s.weight for s in STEPS[index:]]
    return time.time() + max(1.0, left * weights[0] / sum(weights))


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="bundle folder (default gpu-check)")
    p.add_argument("--data", default=os.environ.get("IDMAP_CIFAR10_JPEG"),
                   help="the unpacked JPEG copy of CIFAR-10 (cifar10-jpeg/), for the fidelity pair and "
                        "the long runs (default $IDMAP_CIFAR10_JPEG)")
    p.add_argument("--long-dir", type=Path, default=Path(tempfile.gettempdir()) / "idmap-gpu-check-long",
                   help="run directories of the long runs, which outlive the call")
    p.add_argument("--rehearse", action="store_true", help="every step on the CPU at tiny sizes")
    p.add_argument("--child", choices=sorted(CHILD_STEPS), help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget < 30:
        p.error("--budget must be at least 30 seconds")
    return args


def child_main(args) -> int:
    ctx = Context(REHEARSAL if args.rehearse else GPU, args.rehearse, args.work, args.deadline, args.data,
                  args.long_dir, record=args.work / f"{args.child}.json")
    CHILD_STEPS[args.child](ctx)
    write_json(ctx.record, {"items": ctx.items, "headline": ctx.headline})
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    paths.repo("idmap-gpu-check")  # its steps run the clone's tests, train.py and scripts/bench.py
    if not args.rehearse and not steps.cuda_available():
        print("error: no CUDA device here; run idmap-gpu-check on the GPU machine, or --rehearse "
              "to run every step on this CPU at tiny sizes", file=sys.stderr)
        return 2
    if args.data and not Path(args.data).is_dir():
        print(f"error: --data {args.data}: no such folder (unpack cifar10-jpeg.tar.gz and pass its "
              f"cifar10-jpeg/ folder)", file=sys.stderr)
        return 2
    # An output place that cannot be made is one line now, not after the first step's minutes.
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.rehearse:
        # Tiny nets on a shared CPU: one thread each. Two threads spinning on 16x16 images cost five
        # times the CPU time here, and the rehearsal runs a dozen processes.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    t_start = time.time()
    end = t_start + args.budget - MARGIN_S
    report = {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "budget_s": args.budget, "rehearse": args.rehearse, "steps": [],
              "command": "idmap-gpu-check " + " ".join(argv)}
    sizes = REHEARSAL if args.rehearse else GPU
    with tempfile.TemporaryDirectory(prefix="idmap-gpu-check-") as tmp:
        work, extra = Path(tmp), []
        for i, step in enumerate(STEPS):
            ctx = Context(sizes, args.rehearse, work, cap(end, i), args.data, args.long_dir)
            t0 = time.time()
            try:
                ctx.child(step.name) if step.child else step.run(ctx)
                status = verdict(ctx.items)
            except Exception as exc:  # a bug in the check itself costs its row, not the window
                status = f"failed: {type(exc).__name__}: {str(exc).strip()[:160]}"
            extra += ctx.extra_logs
            report["steps"].append({"step": step.name, "status": status, "seconds": time.time() - t0,
                                    "headline": ctx.headline, "items": ctx.items})
            print(f"[{step.name}] {status} ({time.time() - t0:.0f} s)", flush=True)
            write_bundle(args.out, report, work, extra)  # a call cut short brings back what it has
        report["seconds"] = time.time() - t_start
        short = write_bundle(args.out, report, work, extra)
    print("\n" + short, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
