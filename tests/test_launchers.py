"""The launcher configs run for real (issue 13): Hydra's joblib launcher with the GPU pool on
stand-in GPUs, and submitit's local executor requeueing a job that gets SIGUSR2 mid-run.

Both need the `launchers` extra, which the `dev` extra (so `make test`) installs; the
importorskip guards only say why a bare `pip install -e .` skips them."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.experimental.callback import Callback

from conftest import ROOT, TINY

TESTS = Path(__file__).resolve().parent


def _start_sweep(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`python train.py -m ARGS` in its own process group, so that whatever it starts (joblib
    workers, submitit's controller and task) can be ended with it."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "-m", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **(env or {})}, start_new_session=True,
    )


@contextlib.contextmanager
def _ended_at_exit(proc: subprocess.Popen):
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the sweep's group: no stray worker survives a test
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    output = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, output
    return output


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _metric_iterations(run_dir: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- joblib: the jobs of a sweep side by side, one stand-in GPU each -----------------------------


class FakeGpuPool(Callback):
    """A Hydra callback (`hydra.callbacks`): it runs in each job's own process, a joblib worker,
    just before the job. There it wraps idmap.run.gpu_pool.pin_job_to_gpu, which launch.main looks up at
    each job, so that the real pool claims a slot on one of the GPUs that CUDA_VISIBLE_DEVICES
    lists and masks the job to it; only the device the job then trains on is the CPU, as there is
    no GPU here. Each job writes what it was given to fake_gpu.json in its run directory, then
    holds its claim until every job of the sweep holds one (IDMAP_TEST_BARRIER, IDMAP_TEST_JOBS):
    so the jobs provably ran at the same time, and so must have claimed different GPUs."""

    def on_job_start(self, config, **kwargs) -> None:
        from idmap.run import gpu_pool as gpus

        if getattr(gpus.pin_job_to_gpu, "fake", False):  # a reused worker patched it already
            return
        real = gpus.pin_job_to_gpu

        @contextlib.contextmanager
        def pin_on_cpu(gpu_pool, num_gpus=None):
            from hydra.core.hydra_config import HydraConfig

            listed = os.environ["CUDA_VISIBLE_DEVICES"].split(",")  # stand-in count: no torch check
            with real(gpu_pool, num_gpus=len(listed)) as device:
                record = {"pid": os.getpid(), "device": device,
                          "mask": os.environ.get("CUDA_VISIBLE_DEVICES"), "all_held": _all_arrive()}
                run_dir = Path(HydraConfig.get().runtime.output_dir)
                (run_dir / "fake_gpu.json").write_text(json.dumps(record))
                yield None if device is None else "cpu"

        pin_on_cpu.fake = True
        gpus.pin_job_to_gpu = pin_on_cpu


def _all_arrive(timeout_s: float = 60) -> bool:
    barrier = Path(os.environ["IDMAP_TEST_BARRIER"])
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout_s
    while len(list(barrier.iterdir())) < int(os.environ["IDMAP_TEST_JOBS"]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.slow
def test_joblib_runs_the_jobs_in_parallel_workers_each_on_its_own_gpu_of_the_pool(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep, barrier = tmp_path / "sweep", tmp_path / "barrier"
    barrier.mkdir()
    env = {
        "CUDA_VISIBLE_DEVICES": "3,5",  # two stand-in GPUs; the pool must mask each job to one
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "IDMAP_TEST_BARRIER": str(barrier),
        "IDMAP_TEST_JOBS": "2",
    }
    proc = _start_sweep(
        "+launcher=local_gpus", "hydra.launcher.n_jobs=2", "gpu_pool.jobs_per_gpu=1",
        f"gpu_pool.lock_dir={tmp_path / 'locks'}", f"hydra.sweep.dir={sweep}",
        "+hydra.callbacks.fake_gpus._target_=test_launchers.FakeGpuPool",
        *TINY, "seed=1,2", env=env,
    )
    with _ended_at_exit(proc):
        output = _finish(proc, timeout=240)
    runs = [sweep / "0_full_preact_110", sweep / "1_full_preact_110"]
    records = [json.loads((run / "fake_gpu.json").read_text()) for run in runs]
    assert all(r["device"] == "cuda:0" and r["all_held"] for r in records), (records, output)
    assert sorted(r["mask"] for r in records) == ["3", "5"]  # one GPU each, at the same time
    pids = {r["pid"] for r in records}
    assert len(pids) == 2 and proc.pid not in pids  # two worker processes, not the launcher's own
    for run, record in zip(runs, records):
        assert f"claimed GPU {record['mask']} (slot 0 of 1)" in (run / "train.log").read_text()
        summary = _summary(run)
        assert (summary["status"], summary["iterations"], summary["device"]) == ("completed", 40, "cpu")
        assert _metric_iterations(run) == [20, 40]
    assert sorted(_summary(run)["seed"] for run in runs) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == ["gpu3.slot0.lock", "gpu5.slot0.lock"]


# ---- submitit: SIGUSR2 mid-run, checkpoint, requeue, resume --------------------------------------

MAX_ITERS = 100  # seconds here, so the signal lands long before the end


def _pids(*needles: str) -> list[int]:
    """Processes whose command line contains every needle (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if all(n in cmdline for n in needles):
                    found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_submitit_requeues_a_job_signalled_with_sigusr2_and_it_resumes_from_its_checkpoint(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("finds submitit's task process through /proc")
    sweep = tmp_path / "sweep"
    run_dir = sweep / "0_full_preact_110"
    # What conf/launcher/slurm.yaml sets for the job, on submitit's local executor: same launcher
    # class, same checkpoint method, same signal handler; only the requeue is a restart by the
    # local controller (exit code 144) rather than `scontrol requeue`.
    proc = _start_sweep(
        "hydra/launcher=submitit_local", "trainer.resume=true", f"hydra.sweep.dir={sweep}",
        *TINY, f"trainer.max_iters={MAX_ITERS}", "seed=1",
    )
    with _ended_at_exit(proc):
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pt").exists():  # the first one, at iteration 20
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        tasks = _pids("submitit.core._submit", str(sweep))
        assert len(tasks) == 1, tasks
        os.kill(tasks[0], signal.SIGUSR2)  # what SLURM sends signal_delay_s before the time limit
        output = _finish(proc, timeout=240)

    log = (run_dir / "train.log").read_text()
    assert log.count("received SIGUSR2") == 1, log
    resumed = [int(i) for i in re.findall(r"resuming .* at iteration (\d+)", log)]
    assert len(resumed) == 1 and 20 <= resumed[0] < MAX_ITERS, log  # continued, not started afresh
    (submitit_log,) = [p for p in sweep.glob(".submitit/*/*_0_log.out") if "%" not in p.parent.name]
    # submitit's own lines (the job's logging repeats them in Hydra's format)
    said = re.findall(r"^submitit \w+ \(.*?\) - (.*)$", submitit_log.read_text(), re.M)
    steps = [" ".join(s.split()[:2]) for s in said]
    assert [s for s in steps if s in ("Starting with", "Calling checkpoint", "Requeued job", "Job completed")] == [
        "Starting with", "Calling checkpoint", "Requeued job",  # the job, signalled: the launcher's
        "Starting with", "Job completed"], said                 # checkpoint(); then its requeue
    summary = _summary(run_dir)
    assert (summary["status"], summary["iterations"]) == ("completed", MAX_ITERS), output
    assert _metric_iterations(run_dir) == list(range(20, MAX_ITERS + 1, 20))  # each evaluation once
    assert not _pids("submitit", str(sweep))  # controller and task ended with the sweep
