"""The GPU pool of a multirun's parallel jobs, with fake device counts: no GPU needed."""

import contextlib
import multiprocessing
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from idmap import IdmapError
from idmap.run import gpu_pool as gpus
from idmap.run.gpu_pool import acquire_gpu, pin_job_to_gpu

CONF = Path(__file__).resolve().parents[1] / "conf"
FORK = multiprocessing.get_context("fork")  # the jobs only need this module's functions: fork is fast


@pytest.fixture(autouse=True)
def no_mask(monkeypatch):
    """The fake GPUs are 0..n-1 whatever the machine running the tests exports."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _job(lock_dir, num_gpus, jobs_per_gpu, hold_s, record):
    with acquire_gpu(lock_dir, num_gpus, jobs_per_gpu, poll_s=0.02) as claim:
        start = time.monotonic()  # system-wide clock: comparable between processes
        time.sleep(hold_s)
        record.put((claim.device, start, time.monotonic()))


def _run_jobs(lock_dir, n, num_gpus, jobs_per_gpu, hold_s):
    record = FORK.Queue()
    args = (lock_dir, num_gpus, jobs_per_gpu, hold_s, record)
    jobs = [FORK.Process(target=_job, args=args) for _ in range(n)]
    for job in jobs:
        job.start()
    runs = [record.get(timeout=20) for _ in jobs]
    for job in jobs:
        job.join()
    return runs


def _most_at_once(runs, device):
    mine = [(start, end) for d, start, end in runs if d == device]
    edges = sorted([(start, 1) for start, _ in mine] + [(end, -1) for _, end in mine])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


@pytest.mark.parametrize("jobs_per_gpu", [1, 2])
def test_parallel_jobs_never_crowd_a_gpu_and_the_extra_ones_queue(tmp_path, jobs_per_gpu):
    n = 2 * jobs_per_gpu + 3  # more jobs than slots
    runs = _run_jobs(str(tmp_path), n, num_gpus=2, jobs_per_gpu=jobs_per_gpu, hold_s=0.3)
    assert len(runs) == n
    assert all(1 <= _most_at_once(runs, d) <= jobs_per_gpu for d in "01")


def test_two_jobs_per_gpu_share_it_but_a_third_waits(tmp_path):
    one_gpu_two_slots = dict(num_gpus=1, jobs_per_gpu=2)
    with contextlib.ExitStack() as held:
        claims = [held.enter_context(acquire_gpu(str(tmp_path), **one_gpu_two_slots)) for _ in range(2)]
        assert [(c.device, c.slot) for c in claims] == [("0", 0), ("0", 1)]
        with pytest.raises(IdmapError, match="no free GPU slot"):
            with acquire_gpu(str(tmp_path), **one_gpu_two_slots, poll_s=0.02, timeout_s=0.1):
                pass


def _hold_forever(lock_dir, ready):
    with acquire_gpu(lock_dir, num_gpus=1):
        ready.set()
        time.sleep(60)


def test_a_killed_job_frees_its_gpu(tmp_path):
    ready = FORK.Event()
    holder = FORK.Process(target=_hold_forever, args=(str(tmp_path), ready))
    holder.start()
    assert ready.wait(10)
    with pytest.raises(IdmapError, match="no free GPU slot"):
        with acquire_gpu(str(tmp_path), num_gpus=1, poll_s=0.02, timeout_s=0.1):
            pass
    os.kill(holder.pid, signal.SIGKILL)  # no exit handler runs: the kernel drops the lock
    holder.join()
    with acquire_gpu(str(tmp_path), num_gpus=1, timeout_s=1) as claim:
        assert claim.device == "0"


def test_jobs_spread_over_gpus_and_go_to_the_least_loaded(tmp_path):
    with contextlib.ExitStack() as held:
        claims = [held.enter_context(acquire_gpu(str(tmp_path), 2, jobs_per_gpu=3)) for _ in range(3)]
        assert [(c.device, c.slot) for c in claims] == [("0", 0), ("1", 0), ("0", 1)]
    # GPU 0 runs two jobs in slots 1 and 2, GPU 1 one job in slot 0: GPU 1 gets the next job.
    with contextlib.ExitStack() as held:
        for device, slot in [("0", 1), ("0", 2), ("1", 0)]:
            held.callback(gpus._unlock, gpus._try_lock(str(tmp_path / f"gpu{device}.slot{slot}.lock")))
        assert held.enter_context(acquire_gpu(str(tmp_path), 2, jobs_per_gpu=3)).device == "1"


def _pool(tmp_path, enabled=True, jobs_per_gpu=1):
    return SimpleNamespace(enabled=enabled, jobs_per_gpu=jobs_per_gpu, lock_dir=str(tmp_path))


def test_a_job_sees_only_its_gpu_among_cuda_visible_devices_and_the_mask_is_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with acquire_gpu(str(tmp_path), num_gpus=2) as other:
        assert other.device == "3"
        with pin_job_to_gpu(_pool(tmp_path), num_gpus=2) as device:
            assert (device, os.environ["CUDA_VISIBLE_DEVICES"]) == ("cuda:0", "5")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pin_job_to_gpu(_pool(tmp_path), num_gpus=2):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_process_whose_cuda_started_keeps_its_mask(tmp_path, monkeypatch):
    # A joblib worker runs job after job in one process; CUDA reads the mask only when it starts.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    started = False
    monkeypatch.setattr(gpus, "_cuda_initialized", lambda: started)
    with pin_job_to_gpu(_pool(tmp_path), num_gpus=2):
        started = True  # the job starts CUDA under the mask "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with acquire_gpu(str(tmp_path), num_gpus=1):  # GPU 3 is busy: the job is told to use cuda:1
        with pin_job_to_gpu(_pool(tmp_path), num_gpus=2) as device:
            assert (device, os.environ["CUDA_VISIBLE_DEVICES"]) == ("cuda:1", "3,5")


def test_the_pool_is_what_cuda_visible_devices_lists_up_to_where_cuda_stops_reading(monkeypatch):
    for mask, pool in [("1, 0,-1,2", ["1", "0"]), ("GPU-1a,GPU-2b", ["GPU-1a", "GPU-2b"]), ("", [])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
        assert gpus.visible_devices(num_gpus=8) == pool


def test_without_the_pool_or_without_gpus_a_job_runs_as_it_would(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    for pool, num_gpus in [(_pool(tmp_path, enabled=False), 2), (_pool(tmp_path), 0)]:
        with pin_job_to_gpu(pool, num_gpus=num_gpus) as device:
            assert (device, os.environ["CUDA_VISIBLE_DEVICES"]) == (None, "3,5")


def test_bad_settings_are_reported_as_such(tmp_path):
    (tmp_path / "file").touch()
    with pytest.raises(IdmapError, match="jobs_per_gpu"):
        with pin_job_to_gpu(_pool(tmp_path, jobs_per_gpu=0), num_gpus=1):
            pass
    with pytest.raises(IdmapError, match="lock_dir"):
        with acquire_gpu(str(tmp_path / "file"), num_gpus=1):
            pass


def _compose(launcher):
    from hydra import compose, initialize_config_dir

    from idmap.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train", overrides=[f"+launcher={launcher}"], return_hydra_config=True)


def test_local_gpus_runs_parallel_jobs_in_the_pool():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = _compose("local_gpus")
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs >= 1
    assert cfg.gpu_pool.enabled and not cfg.trainer.progress


def test_slurm_requeues_timed_out_jobs_that_resume_from_their_checkpoint():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose("slurm")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.max_num_timeout > 0 and cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.trainer.resume and not cfg.gpu_pool.enabled
