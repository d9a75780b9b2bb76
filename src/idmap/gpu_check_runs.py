"""The GPU check's steps made of separate processes, each with a timeout: the GPU tests (pytest),
the benchmark (scripts/bench.py), packing several runs on the GPU, the fidelity pair and the long
runs (train.py, as a user starts them). The check's own process only starts, waits and reads files.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from idmap.bench import steady_rate
from idmap.gpu_check_sizes import FAST, NO_CUDA, QUIET, train_overrides
# The clone whose train.py, scripts/ and tests/ the check runs (gpu_check refuses an installed copy).
from idmap.paths import REPO as ROOT
from idmap.rundir import read_metrics, read_summary


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------
def child_env(extra: dict | None = None) -> dict:
    """The environment of every process the check starts: this checkout's code first."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """`cmd` in a process session of its own (so it and what it starts can be ended together, and
    it outlives the call where nobody ends it), its output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env or child_env(),
                                start_new_session=True)


def end(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Ends `proc` and the processes it started (its session), then reaps it."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def wait_all(procs: list[subprocess.Popen], deadline: float) -> list[int | None]:
    """Exit codes; None for a process that ran past `deadline` (then ended)."""
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.5, deadline - time.time())))
        except subprocess.TimeoutExpired:
            end(proc)
            codes.append(None)
    return codes


def run_logged(cmd: list[str], log: Path, deadline: float, env: dict | None = None) -> int | None:
    return wait_all([start(cmd, log, env)], deadline)[0]


def last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return (lines[-1].strip() if lines else "no output")[:160]


def train_cmd(overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]


def share(ctx, parts_left: float) -> float:
    """A deadline for the next of `parts_left` equal parts of the step's time left."""
    return time.time() + ctx.left() / max(1.0, parts_left)


# --------------------------------------------------------------------------------------------------
# tests: pytest -m gpu
# --------------------------------------------------------------------------------------------------
RESULT = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(?: \((.*)\))?")


def read_test_results(log: Path) -> dict[str, str]:
    """Test -> row status, from the lines `pytest -v` prints as each test ends, so that a run cut
    short at its cap still names the tests it finished."""
    results = {}
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        m = RESULT.match(line)
        if m:
            name, result, why = m.group(1).removeprefix("tests/"), m.group(2), m.group(3) or ""
            results[name] = {"PASSED": "ok", "XFAIL": "ok", "SKIPPED": f"skipped: {why or 'skipped'}"}.get(
                result, f"failed: {result.lower()}{': ' + why if why else ''}")
    return results


def tests(ctx) -> None:
    log = ctx.log_path("tests")
    # Only the files that mark tests gpu: collecting the whole suite takes seconds and selects nothing more.
    files = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
             if "mark.gpu" in p.read_text()]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-o", "console_output_style=classic",
           *(files or ["tests"])]
    rc = run_logged(cmd, log, ctx.deadline, child_env({"COLUMNS": "400"}))  # reasons not cut to fit a terminal
    for name, status in read_test_results(log).items():
        ctx.add(name, status)
    if rc is None:
        ctx.add("pytest -m gpu", f"failed: timed out after {len(ctx.items)} tests")
    elif rc not in (0, 1) or not ctx.items:
        ctx.add("pytest -m gpu", f"failed: exit {rc}: {last_line(log)}")
    counts = {k: sum(i["status"].startswith(k) for i in ctx.items) for k in ("ok", "failed", "skipped")}
    ctx.headline = ", ".join(f"{v} {'passed' if k == 'ok' else k}" for k, v in counts.items() if v)


# --------------------------------------------------------------------------------------------------
# bench: scripts/bench.py, one process per group of depths, and the ghost BN timing
# --------------------------------------------------------------------------------------------------
BENCH_KEYS = ("depth", "setting", "images_per_sec", "ms_per_iter", "peak_mib", "speedup", "minutes_64k")


def bench_rows(log: Path) -> list[dict]:
    """The rows bench.py printed as it went (so a group cut short keeps the rows it finished)."""
    rows = {}
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == len(BENCH_KEYS) and cells[0].isdigit():
            row = dict(zip(BENCH_KEYS, cells))
            for k in BENCH_KEYS[2:]:
                text = row[k].replace(",", "").removesuffix("x")
                row[k] = float(text) if re.fullmatch(r"[0-9.]+", text) else None
            rows[(row["depth"], row["setting"])] = row
    return list(rows.values())


def bench(ctx) -> None:
    groups = ctx.sizes.bench_groups
    for k, (label, args) in enumerate(groups):
        log = ctx.log_path(f"bench-{label.replace(' ', '')}")
        cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), *args, "--device", ctx.sizes.device]
        rc = run_logged(cmd, log, share(ctx, len(groups) - k + 0.5))
        for row in bench_rows(log):
            failed = row["images_per_sec"] is None
            status = "failed: " + row_failure(log, row) if failed else "ok"
            ctx.add(f"depth {row.pop('depth')}: {row.pop('setting')}", status,
                    **{key: v for key, v in row.items() if v is not None})
        if rc is None or rc:
            ctx.add(label, "failed: timed out" if rc is None else f"failed: exit {rc}: {last_line(log)}")
    ctx.child("ghost_bn")
    best = {}
    ghost = [i for i in ctx.items if i["name"].startswith("ghost BN") and "speedup" in i]
    for i in ctx.items:  # the bench rows, "depth D: setting"; the ghost BN rows have their own speed-up
        depth = i["name"].split(":")[0]
        if i not in ghost and i.get("speedup") and i["speedup"] > best.get(depth, (0, ""))[0]:
            best[depth] = (i["speedup"], i["name"].split(": ", 1)[1])
    ctx.headline = "; ".join([f"{d}: {v:.2f}x classic" for d, (v, _) in best.items()]
                             + [f"ghost BN one pass {g['speedup']:.2f}x" for g in ghost[:1]])


def row_failure(log: Path, row: dict) -> str:
    for line in log.read_text(errors="replace").splitlines():
        if f"| {row['setting']} | failed: " in line:
            return line.split("failed: ", 1)[1].split("|")[0].strip()
    return "no number"


# --------------------------------------------------------------------------------------------------
# packing: k ResNet-20 runs at once on the one GPU (plain, then under CUDA MPS if it starts)
# --------------------------------------------------------------------------------------------------
def concurrent(ctx, tag: str, k: int, deadline: float, env: dict | None = None) -> dict:
    s = ctx.sizes
    warm, timed = s.packing_iters
    overrides = [*train_overrides(s, warm + timed, warm), *s.resnet20, *FAST]
    dirs = [ctx.work / "packing" / f"{tag}-{k}-{i}" for i in range(k)]
    t0 = time.time()
    procs = [start(train_cmd([*overrides, f"seed={i}"], d), ctx.log_path(f"packing-{tag}-{k}-{i}"), env)
             for i, d in enumerate(dirs)]
    codes = wait_all(procs, deadline)
    metrics = [read_metrics(d) if d.exists() else [] for d in dirs]
    rates = [steady_rate(m, s.batch) if len(m) > 1 else None for m in metrics]
    if any(c != 0 or r is None for c, r in zip(codes, rates)):
        bad = next(i for i, (c, r) in enumerate(zip(codes, rates)) if c != 0 or r is None)
        why = "timed out" if codes[bad] is None else f"exit {codes[bad]}: {last_line(ctx.log_path(f'packing-{tag}-{k}-{bad}'))}"
        return ctx.add(f"{tag}: {k} runs", f"failed: run {bad} {why}", seconds=time.time() - t0)
    return ctx.add(f"{tag}: {k} runs", aggregate_images_per_sec=sum(rates), slowest_run=min(rates),
                   seconds=time.time() - t0)


def mps_daemon(ctx) -> tuple[dict | None, str]:
    """(the clients' environment, '') once an MPS control daemon of our own runs, else (None, why).
    It needs no change to the GPU's settings (compute mode stays as found)."""
    control = shutil.which("nvidia-cuda-mps-control")
    if not control:
        return None, "skipped: nvidia-cuda-mps-control is not on this machine"
    pipe, logs = ctx.work / "mps" / "pipe", ctx.work / "mps" / "log"
    pipe.mkdir(parents=True, exist_ok=True), logs.mkdir(parents=True, exist_ok=True)
    env = child_env({"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs)})
    rc = run_logged([control, "-d"], ctx.log_path("mps"), time.time() + 10, env)
    return (env, "") if rc == 0 else (None, f"failed: the MPS control daemon did not start (exit {rc})")


def packing(ctx) -> None:
    levels = ctx.sizes.packing_levels
    mps_levels = [k for k in levels if k >= 4] if ctx.cuda else []
    parts = len(levels) + len(mps_levels)
    for n, k in enumerate(levels):
        concurrent(ctx, "plain", k, share(ctx, parts - n))
    if not ctx.cuda:
        ctx.add("CUDA MPS", NO_CUDA)
    else:
        env, why = mps_daemon(ctx)
        if env is None:
            ctx.add("CUDA MPS", why)
        else:
            try:
                for n, k in enumerate(mps_levels):
                    concurrent(ctx, "MPS", k, share(ctx, len(mps_levels) - n), env)
            finally:
                _quit_mps(env, ctx)
    rates = {i["name"]: i["aggregate_images_per_sec"] for i in ctx.items if "aggregate_images_per_sec" in i}
    ctx.headline = "; ".join(f"{name.split(': ')[1].split()[0]}{' MPS' if 'MPS' in name else ''}: {r:,.0f} img/s"
                             for name, r in rates.items())


def _quit_mps(env: dict, ctx) -> None:
    with open(ctx.log_path("mps"), "ab") as log:
        subprocess.run([shutil.which("nvidia-cuda-mps-control")], input=b"quit\n", env=env, stdout=log,
                       stderr=subprocess.STDOUT, timeout=20, check=False)


# --------------------------------------------------------------------------------------------------
# fidelity: strict fp32 against the fastest setting on the JPEG copy; long runs of the paper protocol
# --------------------------------------------------------------------------------------------------
def _real_data(ctx) -> list[str] | None:
    """Overrides for the JPEG copy of CIFAR-10 (decoded and cached once, here), or the rehearsal's
    synthetic set; None with a row added when the copy is missing."""
    if ctx.rehearse:
        return list(ctx.sizes.data)
    if not ctx.data:
        ctx.add("data", "failed: no JPEG copy of CIFAR-10: pass --data DIR (the unpacked cifar10-jpeg/)")
        return None
    ctx.child("jpeg_cache")
    return ["dataset=cifar10_jpeg", f"dataset.root={ctx.data}", "trainer.eval_batch_size=1000"]


def fidelity(ctx) -> None:
    s, data = ctx.sizes, _real_data(ctx)
    if data is None:
        return
    n = s.fidelity_iters
    common = [*s.resnet20, *data, f"trainer.device={s.device}", f"trainer.batch_size={s.batch}", "seed=0",
              f"trainer.max_iters={n}", f"optim.milestones=[{n // 2},{3 * n // 4}]",
              f"trainer.eval_every={max(1, n // 4)}", f"trainer.log_every={max(1, n // 20)}", *QUIET]
    fastest = [*FAST, "trainer.compile=reduce-overhead"] if ctx.cuda else list(FAST)
    pair = {"strict fp32": ["trainer.precision=fp32"], "fastest (" + " ".join(fastest) + ")": fastest}
    dirs = {name: ctx.work / "fidelity" / str(k) for k, name in enumerate(pair)}
    procs = [start(train_cmd([*common, *extra], dirs[name]), ctx.log_path(f"fidelity-{k}"))
             for k, (name, extra) in enumerate(pair.items())]
    codes = wait_all(procs, ctx.deadline)
    label = "CIFAR-10 (JPEG copy)" if not ctx.rehearse else "synthetic (rehearsal)"
    errors = []
    for (name, d), code in zip(dirs.items(), codes):
        try:
            summary = read_summary(d)
        except ValueError:
            summary = {"status": "no summary"}
        ok = code == 0 and summary.get("status") == "completed"
        errors.append(summary.get("final_test_error"))
        ctx.add(name, "ok" if ok else f"failed: {'timed out' if code is None else summary.get('status')}",
                data=label, iterations=summary.get("iterations"), test_error=summary.get("final_test_error"),
                train_error=summary.get("final_train_error"), images_per_sec=summary.get("images_per_sec"))
    if all(e is not None for e in errors):
        ctx.headline = f"{label}, {n} iters: test error {errors[0]:.2f}% strict vs {errors[1]:.2f}% fastest"


def long_runs(ctx) -> None:
    """ResNet-20 original and full_preact, the paper protocol, in process sessions of their own so
    they run on after the call; the bundle gets their progress when the budget is spent."""
    import datetime

    s, data = ctx.sizes, _real_data(ctx)
    if data is None:
        return
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    length = [] if s.long_iters is None else [f"trainer.max_iters={s.long_iters}", f"trainer.batch_size={s.batch}",
                                               f"trainer.eval_every={s.long_iters // 2}", "trainer.log_every=1"]
    runs = {}
    for block in ("original", "full_preact"):
        run_dir = ctx.long_dir / f"resnet20-{block}-{stamp}"
        log = ctx.long_dir / f"resnet20-{block}-{stamp}.log"
        cmd = train_cmd([*s.resnet20, f"block={block}", *data, f"trainer.device={s.device}", *FAST,
                         "trainer.progress=false", *length], run_dir)
        runs[block] = (start(cmd, log), run_dir)
        ctx.extra_logs.append(log)
    while time.time() < ctx.deadline - 1 and any(p.poll() is None for p, _ in runs.values()):
        time.sleep(0.5)
    for block, (proc, run_dir) in runs.items():
        ctx.add(f"ResNet-20 {block}", **progress(run_dir, proc), pid=proc.pid, run_dir=str(run_dir))
        if ctx.rehearse and proc.poll() is None:  # a rehearsal leaves nothing running
            end(proc, signal.SIGTERM)
    ctx.headline = "; ".join(f"{i['name'][10:]}: it {i.get('iteration', 0)}, done ~{i.get('projected_finish', '?')}"
                             for i in ctx.items if i["name"].startswith("ResNet-20"))


def progress(run_dir: Path, proc: subprocess.Popen) -> dict:
    import datetime

    try:
        summary = read_summary(run_dir)
        metrics = read_metrics(run_dir)
    except (ValueError, OSError):
        summary, metrics = {}, []
    running = proc.poll() is None
    out = {"status": "ok" if running or summary.get("status") == "completed"
           else f"failed: exit {proc.returncode}, {summary.get('status', 'no summary')}"}
    if not metrics:
        return {**out, "iteration": 0, "note": "started; no evaluation yet"}
    last, total = metrics[-1], summary.get("max_iters") or 64_000
    per_iter = last["elapsed"] / last["iteration"]  # training, evaluations and checkpoints
    finish = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
        seconds=(total - last["iteration"]) * per_iter if running else 0)
    return {**out, "iteration": last["iteration"], "of": total, "test_error": last["test_error"],
            "images_per_sec": last["images_per_sec"], "projected_finish": finish.strftime("%H:%M UTC"),
            "running": running, "finite": math.isfinite(last["train_loss"])}
