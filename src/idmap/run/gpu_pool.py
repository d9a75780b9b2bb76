"""One GPU per job for the parallel jobs of a multirun on one machine.

Hydra's launchers start jobs that each see every GPU, so each would train on cuda:0. Here a job
claims a slot (GPU i, slot j) by holding an exclusive flock on lock_dir/gpu{i}.slot{j}.lock. The
kernel drops a flock when its holder exits, however it exits, so a crashed or killed job frees its
GPU and there is no stale state to clean up. A job that finds every slot taken polls: it queues.
The lock directory must be local to the machine, as the GPUs are: one shared between nodes would
make jobs on different nodes wait for each other's GPU 0.
"""

import contextlib
import fcntl
import logging
import os
import re
import sys
import time
from typing import Iterator, List, NamedTuple, Optional, Tuple

from idmap import IdmapError

log = logging.getLogger(__name__)


class GpuClaim(NamedTuple):
    index: int  # position among the visible devices, i.e. cuda:<index> before any re-masking
    device: str  # the id CUDA_VISIBLE_DEVICES names it by (an ordinal or a UUID)
    slot: int


def visible_devices(num_gpus: Optional[int] = None) -> List[str]:
    """The pool: the ids CUDA_VISIBLE_DEVICES lists (ordinals when unset), at most num_gpus of them.

    Nothing here may start CUDA, which reads CUDA_VISIBLE_DEVICES once, when it starts: the mask a
    job sets afterwards would do nothing. So a listed mask is taken as it is (torch would start
    CUDA to count MIG ids), and without one torch counts through NVML, which does not start CUDA.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    listed = None
    if env is not None:
        listed = []
        for device in (d.strip() for d in env.split(",")):
            if not device or device.startswith("-"):  # CUDA ignores the list from here on
                break
            listed.append(device)
    if num_gpus is None:
        import torch

        if not torch.backends.cuda.is_built():
            num_gpus = 0
        elif listed is not None:
            num_gpus = len(listed)
        else:
            num_gpus = torch.cuda.device_count()
    return [str(i) for i in range(num_gpus)] if listed is None else listed[:num_gpus]


def _try_lock(path: str) -> Optional[int]:
    """An fd holding the exclusive lock on path, or None if another open file holds it."""
    try:
        # Read-only is enough for flock, so lock files another user created still open.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as e:
        raise IdmapError(
            f"cannot open GPU lock {path}: {e.strerror}; point gpu_pool.lock_dir "
            "(or IDMAP_GPU_LOCKS) at a writable directory on this machine"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def _unlock(fd: int) -> None:
    # Explicit LOCK_UN: a forked child (a data worker) sharing the fd would otherwise keep the lock.
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _claim(slots: List[List[str]]) -> Optional[Tuple[int, int, int]]:
    """(gpu, slot, fd) of a free slot on the least-loaded GPU, or None when every slot is taken."""

    def is_free(path: str) -> bool:
        fd = _try_lock(path)
        if fd is not None:
            _unlock(fd)
        return fd is not None

    # The count is a snapshot that a racing job can change; the lock below is what decides.
    load = [sum(not is_free(p) for p in paths) for paths in slots]
    for i in sorted(range(len(slots)), key=load.__getitem__):
        for j, path in enumerate(slots[i]):
            fd = _try_lock(path)
            if fd is not None:
                return i, j, fd
    return None


@contextlib.contextmanager
def acquire_gpu(
    lock_dir: str,
    num_gpus: Optional[int] = None,
    jobs_per_gpu: int = 1,
    poll_s: float = 1.0,
    timeout_s: Optional[float] = None,
) -> Iterator[GpuClaim]:
    """Hold one of jobs_per_gpu slots on one of the visible GPUs until the block exits.

    GPUs fill evenly: a job takes a slot on the GPU with the fewest jobs. With every slot taken it
    waits, polling every poll_s, for timeout_s seconds (None: for as long as it takes).
    """
    if jobs_per_gpu < 1:
        raise IdmapError(f"gpu_pool.jobs_per_gpu must be at least 1, got {jobs_per_gpu}")
    pool = visible_devices(num_gpus)
    if not pool:
        raise IdmapError("no GPU to claim: CUDA sees no device")
    try:
        os.makedirs(lock_dir, exist_ok=True)
    except OSError as e:
        raise IdmapError(f"cannot use {lock_dir!r} as gpu_pool.lock_dir: {e.strerror}") from None
    # Named by device id, not position, so sweeps with different masks still see each other's claims.
    names = [re.sub(r"[^\w.-]", "_", d) for d in pool]  # MIG ids of old drivers contain "/"
    slots = [[os.path.join(lock_dir, f"gpu{n}.slot{j}.lock") for j in range(jobs_per_gpu)] for n in names]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waited = False
    while (claim := _claim(slots)) is None:
        if deadline is not None and time.monotonic() >= deadline:
            raise IdmapError(f"no free GPU slot in {lock_dir} after {timeout_s:g} s")
        if not waited:
            log.info("all %d GPU slots in %s are taken: waiting for one", len(pool) * jobs_per_gpu, lock_dir)
            waited = True
        time.sleep(poll_s)
    i, j, fd = claim
    log.info("claimed GPU %s (slot %d of %d)", pool[i], j, jobs_per_gpu)
    try:
        yield GpuClaim(i, pool[i], j)
    finally:
        _unlock(fd)


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")  # CUDA cannot have started in a process that never imported torch
    return torch is not None and torch.cuda.is_initialized()


def _cuda_device_count() -> int:
    """The GPUs CUDA itself sees once started (torch.cuda.device_count asks NVML, which reads the
    mask afresh, whatever CUDA saw when it started)."""
    import torch

    torch.cuda.init()
    return torch._C._cuda_getDeviceCount()


def _check_masked(device: str) -> None:
    """Starts CUDA under the job's mask and checks that it took. Where torch cannot use NVML,
    counting the GPUs started CUDA before the mask was set, and every job would train on GPU 0."""
    import torch

    if not torch.cuda.is_available():  # a pool of stand-in ids (tests), or no GPU after all
        return
    seen = _cuda_device_count()
    if seen != 1:
        raise IdmapError(
            f"gpu_pool: this job claimed GPU {device}, but CUDA started before the job could hide the "
            f"others and sees {seen} GPUs (torch could not count them through NVML); give each job its "
            f"GPU with CUDA_VISIBLE_DEVICES yourself, or set gpu_pool.enabled=false"
        )


@contextlib.contextmanager
def pin_job_to_gpu(gpu_pool, num_gpus: Optional[int] = None) -> Iterator[Optional[str]]:
    """Give this job one GPU of the pool for the block's lifetime; a no-op when the pool is off.

    gpu_pool is the config's GpuPoolConfig (enabled, jobs_per_gpu, lock_dir); num_gpus stands in
    for the device count (tests). Yields the torch device to train on ("cuda:0" once this job sees
    only its GPU), or None when there is no pool: no GPU, or gpu_pool.enabled false.
    """
    if not gpu_pool.enabled:
        yield None
        return
    if not visible_devices(num_gpus):
        log.warning("gpu_pool.enabled but CUDA sees no GPU: running without the pool")
        yield None
        return
    started = _cuda_initialized()
    with acquire_gpu(gpu_pool.lock_dir, num_gpus, gpu_pool.jobs_per_gpu) as claim:
        if started:
            # CUDA already read the mask in this process (a joblib worker reuses its process for
            # the next job), so re-masking would do nothing: address the claimed GPU by position.
            yield f"cuda:{claim.index}"
            return
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = claim.device
        try:
            _check_masked(claim.device)
            yield "cuda:0"
        finally:
            # If CUDA started under the mask, the process keeps that GPU for life; the variable
            # stays so that it still tells the next job in this process the truth.
            if not _cuda_initialized():
                if before is None:
                    del os.environ["CUDA_VISIBLE_DEVICES"]
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = before
