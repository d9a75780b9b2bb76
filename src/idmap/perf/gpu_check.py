"""Prepared commands for a GPU window: what the first GPU sessions must learn, in two calls.

    idmap-gpu-check [--part 1|2] [--budget SECONDS] [--out DIR] [--data JPEG_ROOT] [--rehearse]

Part 1 (300 s): machine, smoke, resume, bench-20, bench-110. Part 2 (250 s): bench-1001, packing,
fused, fidelity, ghost-bn. docs/benchmarks.md says what each measures. Each step has a time cap
sized from a written estimate of what it must do (STEPS); time a step leaves unused goes to the
steps after it. A step whose code can hang or crash CUDA runs in a child process killed at its
cap, so a bad step costs one row, not the window; every step writes a row ("failed: reason",
"skipped: needs CUDA"). Every process the check starts is ended by the time it returns. The bundle
under --out is three files, rewritten after every step so that a call cut short still brings back
what it has: summary.md (the table, printed last on stdout too), results.json (every number) and
logs.tar.gz.

--rehearse runs every step of both parts on the CPU at tiny sizes through the same code, so the
command cannot rot before a GPU arrives (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import datetime
import io
import itertools
import json
import os
import signal
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from idmap.perf import gpu_check_processes as runs, gpu_check_steps as steps
from idmap import paths
from idmap.perf.gpu_check_processes import last_line, run_logged
from idmap.perf.gpu_check_sizes import GPU, REHEARSAL, Sizes
from idmap.rundir import atomic_write, write_json

SUMMARY_MD, RESULTS_JSON, LOGS_TAR = "summary.md", "results.json", "logs.tar.gz"
RUNNING_PGIDS = "running.pgids"  # in --out while children run (gpu_check_processes.PGIDS)
LOG_TAIL = 2 * 2**20  # bytes of each log kept in the bundle (its end: where failures are)


@dataclass(frozen=True)
class Step:
    name: str
    part: int  # the call that runs it: 1 (the default) or 2 (--part 2)
    cap_s: int  # seconds on the GPU, from `estimate`: what the step must do there and why that fits
    estimate: str
    run: object  # fn(ctx)
    child: bool  # run in a child process (CUDA work that may hang or crash)


# In the order of what the project needs to know first. The estimates are for one H100 or H200 on
# a fresh machine (cold disk and compile caches); compile times are not yet measured on a GPU.
STEPS = (
    Step("machine", 1, 20, "a fresh machine's first torch import and CUDA context (~10 s); two 2 GiB "
         "buffers and 26 timed copies and matrix products (~1 s)", steps.machine, True),
    Step("smoke", 1, 105, "a child's start (~10 s); 19 eager runs of 20 iterations (depths 20 and 164, "
         "and the depth-8 references of the compiled rows), ~1-4 s each with cuDNN autotuning and an "
         "evaluation (~45 s); then 3 compiles of the depth-8 net, training and evaluation graphs, ~15 s "
         "each (~45 s)", steps.smoke, True),
    Step("resume", 1, 25, "a child's start (~10 s); three deterministic ResNet-20 runs of 200 "
         "iterations with 10 checkpoints each (~3 s each)", steps.resume, True),
    Step("bench-20", 1, 55, "bench.py's start (~10 s); the classic loop and its strict-fp32 twin, 130 "
         "iterations with 8 loader workers (~4 s each); the fast setting eager (~3 s); the same compiled "
         "with CUDA graphs, training and evaluation graphs (~30 s)", runs.bench, False),
    Step("bench-110", 1, 95, "bench.py's start (~10 s); the two classic rows, 80 iterations at ~25 ms "
         "(~5 s each); the fast setting eager (~5 s); the same compiled, a graph 5x depth 20's (~60 s)",
         runs.bench, False),
    Step("bench-1001", 2, 60, "bench.py's start (~10 s); ResNet-1001 built four times (~2 s each); the "
         "two classic rows, 12 iterations at ~0.4 s (~6 s each); the fast setting with and without "
         "checkpointing, 12 iterations at ~0.2 s and cuDNN autotuning (~8 s each)", runs.bench, False),
    Step("packing", 2, 90, "per level, k train.py starts at once (~8 s), then 650 iterations at ~5 ms "
         "(1 run) to ~20 ms (8 runs): ~11, ~15 and ~21 s for 1, 4 and 8 runs; 4 and 8 again under MPS "
         "(~36 s), its start and quit (~3 s)", runs.packing, False),
    Step("fused", 2, 25, "a child's start (~10 s); 1, 4 and 8 ResNet-20s as one, 3 warm-up and 50 "
         "timed steps each with cuDNN autotuning (~3 s each)", steps.fused, True),
    Step("fidelity", 2, 55, "decoding the 60,000 JPEGs in a child (~20 s); two train.py runs side by "
         "side, a start (~8 s) and 1,000 ResNet-20 iterations at ~10 ms with 4 evaluations (~12 s)",
         runs.fidelity, False),
    Step("ghost-bn", 2, 20, "a child's start (~10 s); depths 20 and 164, one pass and chunked, 53 "
         "steps each at ~5 to 25 ms (~5 s)", steps.ghost_bn, True),
)
CHILD_STEPS = {s.name: s.run for s in STEPS if s.child} | {"jpeg_cache": steps.jpeg_cache}


@dataclass
class Context:
    """What a step gets: its sizes, its deadline, where to work, and `add` for its rows."""

    sizes: Sizes
    rehearse: bool
    work: Path
    deadline: float  # time.time() by which the step must be done
    data: str | None = None  # root of the unpacked JPEG copy of CIFAR-10
    step: str = ""
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
        cmd = [sys.executable, "-m", "idmap.perf.gpu_check", "--child", name, "--work", str(self.work),
               "--deadline", str(deadline)]
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
    table = ["| step | result | seconds | allowed | headline |", "|---|---|---|---|---|"]
    table += [f"| {r['step']} | {cell(r['status'])} | {r['seconds']:.0f} | {r['allowed_s']:.0f} | "
              f"{cell(r['headline'])} |" for r in report["steps"]]
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


def deadlines(chosen: list[Step], start: float, budget: float) -> list[float]:
    """Each step's deadline: the caps up to and including its own, scaled to the budget, from the
    start. A step may so use what the steps before it left unused, and the call ends by the budget."""
    scale = budget / sum(s.cap_s for s in chosen)
    return [start + scale * used for used in itertools.accumulate(s.cap_s for s in chosen)]


def chosen_steps(part: int, rehearse: bool) -> list[Step]:
    return [s for s in STEPS if rehearse or s.part == part]


def plan_table() -> str:
    """The steps with their calls, caps and estimates (docs/benchmarks.md holds a copy, checked)."""
    lines = ["| step | call | cap (s) | what it must do, and why that fits |", "|---|---|---|---|"]
    lines += [f"| `{s.name}` | {s.part} | {s.cap_s} | {s.estimate} |" for s in STEPS]
    for part in (1, 2):
        lines.append(f"| part {part} | | {sum(s.cap_s for s in chosen_steps(part, False))} | |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def parse_args(argv):
    from idmap import cli

    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", type=int, choices=(1, 2), default=1,
                   help="which call: 1 (default) or 2, for the steps that do not fit in the first")
    p.add_argument("--budget", type=cli.number(float, 30, strict=False),
                   help="seconds for the steps, at least 30 (default: the sum of the part's caps)")
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="bundle folder (default gpu-check)")
    p.add_argument("--data", default=os.environ.get("IDMAP_CIFAR10_JPEG"),
                   help="the unpacked JPEG copy of CIFAR-10 (cifar10-jpeg/), for the fidelity pair "
                        "(default $IDMAP_CIFAR10_JPEG)")
    p.add_argument("--rehearse", action="store_true", help="every step of both parts on the CPU at tiny sizes")
    p.add_argument("--child", choices=sorted(CHILD_STEPS), help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    earlier = [name for name in (SUMMARY_MD, RESULTS_JSON, LOGS_TAR) if (args.out / name).exists()]
    if earlier and not args.child:  # a GPU window's numbers are not overwritten unasked
        p.error(f"--out {args.out} holds an earlier bundle ({earlier[0]}); choose another --out, or move "
                f"that one aside")
    return args


def child_main(args) -> int:
    ctx = Context(REHEARSAL if args.rehearse else GPU, args.rehearse, args.work, args.deadline, args.data,
                  args.child, record=args.work / f"{args.child}.json")
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
    # A SIGTERM (a timeout around the call) ends the check through its `finally`, children and all.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    runs.PGIDS = args.out / RUNNING_PGIDS
    try:
        return run_steps(args, argv)
    finally:
        runs.end_all()


def run_steps(args, argv: list[str]) -> int:
    chosen = chosen_steps(args.part, args.rehearse)
    budget = args.budget or sum(s.cap_s for s in chosen)
    t_start = time.time()
    report = {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "budget_s": budget, "rehearse": args.rehearse, "steps": [],
              "command": "idmap-gpu-check " + " ".join(argv)}
    sizes = REHEARSAL if args.rehearse else GPU
    with tempfile.TemporaryDirectory(prefix="idmap-gpu-check-") as tmp:
        work, extra = Path(tmp), []
        for step, deadline in zip(chosen, deadlines(chosen, t_start, budget)):
            ctx = Context(sizes, args.rehearse, work, deadline, args.data, step.name)
            t0 = time.time()
            try:
                ctx.child(step.name) if step.child else step.run(ctx)
                status = verdict(ctx.items)
            except Exception as exc:  # a bug in the check itself costs its row, not the window
                status = f"failed: {type(exc).__name__}: {str(exc).strip()[:160]}"
            extra += ctx.extra_logs
            report["steps"].append({"step": step.name, "status": status, "seconds": time.time() - t0,
                                    "allowed_s": deadline - t0, "headline": ctx.headline,
                                    "items": ctx.items})
            print(f"[{step.name}] {status} ({time.time() - t0:.0f} s)", flush=True)
            write_bundle(args.out, report, work, extra)  # a call cut short brings back what it has
        report["seconds"] = time.time() - t_start
        short = write_bundle(args.out, report, work, extra)
    print("\n" + short, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
