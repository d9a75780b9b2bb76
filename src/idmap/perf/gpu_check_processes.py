"""The GPU check's steps made of separate processes, each ended at a deadline: the benchmark
(scripts/bench.py), packing several runs on the GPU and the fidelity pair (train.py, as a user
starts them). The check's own process only starts, waits and reads files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from idmap.perf.gpu_check_sizes import FAST, NO_CUDA, PACKED, QUIET, train_overrides
# The clone whose train.py, scripts/ and tests/ the check runs (gpu_check refuses an installed copy).
from idmap.paths import REPO as ROOT
from idmap.rundir import Status, has_metrics, read_metrics, read_summary


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------
RUNNING: list[subprocess.Popen] = []  # what the check started and has not ended yet
PGIDS: Path | None = None  # where the process groups in RUNNING are listed (set by gpu_check.main)


def child_env(extra: dict | None = None) -> dict:
    """The environment of every process the check starts: this checkout's code first."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _list_running() -> None:
    """Lists the groups still running (as `kill -9 --` takes them), so that the recipe's last
    command ends them should the check die before it ends them itself; no file once none runs."""
    if PGIDS:
        if RUNNING:
            PGIDS.write_text("".join(f"-{p.pid}\n" for p in RUNNING))
        else:
            PGIDS.unlink(missing_ok=True)


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """`cmd` in a process group of its own, so that it and what it starts are ended together, but
    in this session: the device tool ends a session's leftovers when its command returns, and
    would leave a new session running into the next call. Its output is appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env or child_env(),
                                **group)
    RUNNING.append(proc)
    _list_running()
    return proc


def end(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Ends `proc` and what it started (its group: also what outlived it), then reaps it."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if proc in RUNNING:
        RUNNING.remove(proc)
        _list_running()


def end_all() -> None:
    for proc in list(RUNNING):
        end(proc)


def wait_all(procs: list[subprocess.Popen], deadline: float) -> list[int | None]:
    """Exit codes; None for a process that ran past `deadline`. Every group is ended after."""
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.5, deadline - time.time())))
        except subprocess.TimeoutExpired:
            codes.append(None)
        end(proc)
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


# --------------------------------------------------------------------------------------------------
# bench: scripts/bench.py, one process per step (its sizes name the depth and the rows)
# --------------------------------------------------------------------------------------------------
def bench_rows(path: Path) -> list[dict]:
    """The rows bench.py wrote to `--rows` as it went (so a process cut short keeps the rows it
    finished; a line cut off mid-write is left out), the last of each (depth, setting)."""
    rows = {}
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        rows[(row["depth"], row["setting"])] = row
    return list(rows.values())


def bench(ctx) -> None:
    log, rows = ctx.log_path(ctx.step), ctx.work / f"{ctx.step}.rows.jsonl"
    rows.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), *ctx.sizes.bench[ctx.step], "--device", ctx.sizes.device,
           "--rows", str(rows)]
    rc = run_logged(cmd, log, ctx.deadline)
    for row in bench_rows(rows):
        error = row.pop("error", None)
        ctx.add(f"depth {row.pop('depth')}: {row.pop('setting')}", f"failed: {error}" if error else "ok",
                **{key: v for key, v in row.items() if v is not None})
    if rc is None or rc:
        ctx.add(ctx.step, "failed: timed out" if rc is None else f"failed: exit {rc}: {last_line(log)}")
    best = max((i for i in ctx.items if i.get("speedup")), key=lambda i: i["speedup"], default=None)
    if best:
        ctx.headline = f"{best['name']}: {best['speedup']:.2f}x classic, {best['ms_per_iter']:.1f} ms/iter"


# --------------------------------------------------------------------------------------------------
# packing: k ResNet-20 runs at once on the one GPU (plain, then under CUDA MPS if it starts)
# --------------------------------------------------------------------------------------------------
def windows(metrics: list[dict], batch: int, after: int) -> list[tuple[float, float, int]]:
    """(start, end, images) on the wall clock of each throughput window that begins at or after
    iteration `after` (the trainer's windows hold training only, so `start` is the end less the
    window's images over its rate)."""
    out = []
    for a, b in zip(metrics, metrics[1:]):
        if a["iteration"] >= after and "time" in b:
            images = (b["iteration"] - a["iteration"]) * batch
            out.append((b["time"] - images / b["images_per_sec"], b["time"], images))
    return out


def together_rate(runs: list[list[dict]], batch: int, after: int) -> tuple[float, float] | None:
    """(images/s of all runs together, seconds) over the span in which every run was past its
    warm-up (`after` iterations) and none had closed its last window, each window's images counted
    in proportion to its part of the span. Summing each run's own rate would count a run's time
    alone (a late start, a straggler at the end) as if shared. None when the spans do not overlap."""
    spans = [windows(m, batch, after) for m in runs]
    if not all(spans):
        return None
    t0, t1 = max(w[0][0] for w in spans), min(w[-1][1] for w in spans)
    if t1 <= t0:
        return None
    images = sum(n * max(0.0, min(e, t1) - max(s, t0)) / (e - s) for w in spans for s, e, n in w)
    return images / (t1 - t0), t1 - t0


def level(ctx, tag: str, k: int, parts_left: int, env: dict | None = None, keep: float = 0.0) -> None:
    """The row of a packing level run in the next of `parts_left` equal parts of the step's time
    left, less `keep` seconds kept for what comes after the levels."""
    status, numbers = concurrent(ctx, tag, k, time.time() + (ctx.left() - keep) / parts_left, env)
    ctx.add(f"{tag}: {k} runs", status, **numbers)


def concurrent(ctx, tag: str, k: int, deadline: float, env: dict | None = None) -> tuple[str, dict]:
    """(status, numbers) of k runs started together and ended at `deadline`."""
    s = ctx.sizes
    warm, timed, every = s.packing_iters
    # One evaluation batch: the evaluations that close the windows cost next to nothing, as in the
    # fused probe, which has none.
    overrides = [*train_overrides(s, warm + timed, every), f"dataset.num_test={s.batch}",
                 f"trainer.eval_batch_size={s.batch}", *s.resnet20, *PACKED]
    dirs = [ctx.work / "packing" / f"{tag}-{k}-{i}" for i in range(k)]
    logs = [ctx.log_path(f"packing-{tag}-{k}-{i}") for i in range(k)]
    t0 = time.time()
    procs = [start(train_cmd([*overrides, f"seed={i}"], d), log, env) for i, (d, log) in enumerate(zip(dirs, logs))]
    codes = wait_all(procs, deadline)
    # A run ended before its first evaluation has no metrics file, or no folder.
    metrics = [read_metrics(d) if has_metrics(d) else [] for d in dirs]
    for i, (code, m) in enumerate(zip(codes, metrics)):
        if code != 0:
            why = "killed at its cap" if code is None else f"exit {code}: {last_line(logs[i])}"
            done = f"at iteration {m[-1]['iteration']}" if m else "before its first evaluation"
            return f"failed: run {i} {why} {done}", {"seconds": time.time() - t0}
    rate = together_rate(metrics, s.batch, warm)
    if rate is None:
        return "failed: the runs' timed windows did not overlap", {"seconds": time.time() - t0}
    return "ok", {"aggregate_images_per_sec": rate[0], "overlap_s": rate[1], "seconds": time.time() - t0}


def mps_daemon(ctx) -> tuple[dict | None, str]:
    """(the clients' environment, '') once an MPS control daemon of our own runs, else (None, why).
    It needs no change to the GPU's settings (compute mode stays as found). Its logs go into the
    bundle."""
    if not shutil.which("nvidia-cuda-mps-control"):
        return None, "skipped: nvidia-cuda-mps-control is not on this machine"
    pipe, logs = ctx.work / "mps" / "pipe", ctx.work / "mps" / "log"
    pipe.mkdir(parents=True, exist_ok=True), logs.mkdir(parents=True, exist_ok=True)
    ctx.extra_logs += [logs / "control.log", logs / "server.log"]
    env = child_env({"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs)})
    why = mps_control(ctx, env, ["-d"])
    return (None, f"failed: the MPS control daemon did not start ({why})") if why else (env, "")


QUIT_MPS_S = 3.0  # kept back from the MPS levels for the daemon to quit inside the step's cap


def mps_control(ctx, env: dict, args: list[str], text: bytes = b"") -> str:
    """Runs nvidia-cuda-mps-control: '' when it succeeded, else why not. It may wait no longer than
    the step's cap (at least a second). Not in a group of its own: `-d` leaves its daemon running."""
    with open(ctx.log_path("mps"), "ab") as log:
        try:
            rc = subprocess.run([shutil.which("nvidia-cuda-mps-control"), *args], input=text, env=env,
                                stdout=log, stderr=subprocess.STDOUT, timeout=max(1.0, ctx.left())).returncode
        except subprocess.TimeoutExpired:
            return "no answer by the step's cap"
    return f"exit {rc}" if rc else ""


def packing(ctx) -> None:
    s = ctx.sizes
    if s.packing_cut_s:
        # Rehearsal: a level ended before any run evaluates, as a cap ends a slow level on a GPU:
        # it must give its row, not end the step.
        status, _ = concurrent(ctx, "cut", 2, time.time() + s.packing_cut_s)
        ok = status.endswith("before its first evaluation")
        ctx.add("2 runs ended before their first evaluation", "ok" if ok else f"failed: {status}", gave=status)
    mps = [k for k in s.packing_levels if k >= 4] if ctx.cuda else []
    for n, k in enumerate(s.packing_levels):
        level(ctx, "plain", k, len(s.packing_levels) + len(mps) - n)
    if not ctx.cuda:
        ctx.add("CUDA MPS", NO_CUDA)
    elif mps:
        env, why = mps_daemon(ctx)
        if env is None:
            ctx.add("CUDA MPS", why)
        else:
            try:
                for n, k in enumerate(mps):
                    level(ctx, "MPS", k, len(mps) - n, env, keep=QUIT_MPS_S)
            finally:
                mps_control(ctx, env, [], b"quit\n")
    rates = {i["name"]: i["aggregate_images_per_sec"] for i in ctx.items if "aggregate_images_per_sec" in i}
    ctx.headline = "; ".join(f"{name}: {r:,.0f} img/s" for name, r in rates.items())


# --------------------------------------------------------------------------------------------------
# fidelity: strict fp32 against the fast setting on the JPEG copy
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
    # Eager: compile is the same maths (smoke's compiled rows check it against eager), and its
    # compile time would not fit; what this pair asks is whether bf16 keeps the error.
    pair = {"strict fp32": ["trainer.precision=fp32"], "fast (" + " ".join(FAST) + ")": list(FAST)}
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
        ok = code == 0 and summary.get("status") == Status.COMPLETED
        errors.append(summary.get("final_test_error"))
        ctx.add(name, "ok" if ok else f"failed: {'killed at its cap' if code is None else summary.get('status')}",
                data=label, iterations=summary.get("iterations"), test_error=summary.get("final_test_error"),
                train_error=summary.get("final_train_error"), images_per_sec=summary.get("images_per_sec"))
    if all(e is not None for e in errors):
        ctx.headline = f"{label}, {n} iters: test error {errors[0]:.2f}% strict vs {errors[1]:.2f}% fast"
