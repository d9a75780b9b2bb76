"""The edge where runs start: the Hydra task, process groups (spawned, torchrun, SLURM tasks), GPU
pinning, exit codes and failure records. Below this module everything takes a plain config."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from idmap import IdmapError
from idmap.rundir import (HYDRA_DIR, HYDRA_LOG, MULTIRUN, SUMMARY, hydra_config_path, hydra_overrides_path,
                          read_summary, update_summary)
from idmap.runtime import Interrupted, resolve_device
from idmap.state import RunExists, settings_changed
from idmap.trainer import train

log = logging.getLogger("idmap")


def hydra_choices() -> dict:
    """The config group choices of the Hydra job this process runs ({} outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra/")}


# --------------------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------------------
def external_group() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) when a launcher started this process as one of several:
    torchrun (its environment variables), or a SLURM/submitit job with several tasks (submitit
    names the master node and exports the same variables). None for a lone process."""
    if os.environ.get("SUBMITIT_EXECUTOR") and "RANK" not in os.environ:
        with contextlib.suppress(ImportError, RuntimeError):
            import submitit

            if submitit.JobEnvironment().num_tasks > 1:
                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _start_group(device_name: str, rank: int, local_rank: int, world_size: int, init_method: str) -> None:
    use_cuda = resolve_device(device_name).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)  # one process per GPU of its node
    else:  # CPU processes share the node's cores rather than each taking all of them
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method, rank=rank,
                            world_size=world_size)


def _spawned(rank: int, world_size: int, cfg_dict: dict, run_dir: str, port: int, choices: dict) -> None:
    cfg = OmegaConf.create(cfg_dict)
    _start_group(cfg.trainer.device, rank, rank, world_size, f"tcp://127.0.0.1:{port}")
    try:
        train(cfg, run_dir, rank, world_size, choices)
    except Interrupted:
        pass
    finally:
        dist.destroy_process_group()


def _spawn(cfg: DictConfig, run_dir: Path, choices: dict) -> dict:
    """`trainer.world_size` data-parallel processes on this machine, one run directory."""
    import socket

    import torch.multiprocessing as mp

    from idmap.data import load_dataset

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_dataset(cfg.dataset)  # fetch (or decode and cache) once here, so the ranks do not race
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    world_size = cfg.trainer.world_size
    mp.spawn(_spawned, args=(world_size, cfg_dict, str(run_dir), port, choices), nprocs=world_size, join=True)
    summary = read_summary(run_dir)
    if summary["status"] == "interrupted":
        raise Interrupted(signal.SIGTERM)
    return summary


def _in_group(cfg: DictConfig, run_dir: Path, choices: dict, group: tuple[int, int, int]) -> dict:
    """This process is one rank of a group a launcher started (torchrun, SLURM tasks). Rank 0's run
    directory is everyone's: each process composed its own, and time-stamped names may differ."""
    rank, local_rank, world_size = group
    if cfg.trainer.world_size not in (1, world_size):
        raise IdmapError(f"trainer.world_size={cfg.trainer.world_size} but the launcher started "
                         f"{world_size} processes; leave trainer.world_size at 1 under torchrun")
    _start_group(cfg.trainer.device, rank, local_rank, world_size, "env://")
    try:
        if local_rank == 0:  # one process per node fetches (or decodes and caches) the data
            from idmap.data import load_dataset

            load_dataset(cfg.dataset)
        dist.barrier()
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] != str(run_dir) and rank:
            _remove_stray(run_dir)
            run_dir = Path(shared[0])
        return train(cfg, run_dir, rank, world_size, choices)
    finally:
        dist.destroy_process_group()


def _remove_stray(run_dir: Path) -> None:
    """The folder Hydra made for a rank > 0 before it learnt rank 0's: removed when it holds no
    more than Hydra's own files (rank > 0 never writes a run's files)."""
    import shutil

    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {HYDRA_DIR, HYDRA_LOG}:
        shutil.rmtree(run_dir, ignore_errors=True)


def run(cfg: DictConfig, run_dir: str | Path, choices: dict | None = None) -> dict:
    """Train one run: in this process, in the process group a launcher started, or in
    `trainer.world_size` processes spawned here. Returns the summary."""
    run_dir, choices = Path(run_dir), hydra_choices() if choices is None else choices
    group = external_group()
    if group:
        return _in_group(cfg, run_dir, choices, group)
    if cfg.trainer.world_size > 1:
        return _spawn(cfg, run_dir, choices)
    return train(cfg, run_dir, choices=choices)


# --------------------------------------------------------------------------------------------------
# Resuming by directory: `python train.py trainer.resume=DIR [settings]`
# --------------------------------------------------------------------------------------------------
def resume_argv(argv: list[str]) -> list[str]:
    """The command line that continues the run or sweep in `trainer.resume=DIR`: the run's own
    overrides (from its .hydra/), then the user's other arguments, which may change how it runs
    (e.g. raise trainer.max_iters) but not what it computes. Other arguments pass through."""
    given = [a for a in argv if a.startswith("trainer.resume=")]
    value = given[-1].split("=", 1)[1].strip("'\"") if given else ""
    if not value or value.lower() in ("true", "false"):
        return argv
    path = Path(value)
    rest = [a for a in argv if not a.startswith("trainer.resume=")]
    keep = lambda overrides: [o for o in overrides if not o.startswith(("trainer.resume=", "hydra."))]
    if hydra_overrides_path(path).is_file():  # one run
        own = keep(OmegaConf.load(hydra_overrides_path(path)))
        args = [*own, *rest, "trainer.resume=true"]
        _refuse_other_settings(path, [a for a in args if not a.startswith(("-", "hydra", "+hydra"))])
        return [*args, f"hydra.run.dir={path}"]
    if (path / MULTIRUN).is_file():  # a sweep: Hydra runs its jobs again, each into its own dir
        plan = OmegaConf.load(path / MULTIRUN).hydra
        own = keep(plan.overrides.task)
        rest = [a for a in rest if a not in ("-m", "--multirun")]
        # The sweep's own job folder names, should train.yaml's pattern have changed since.
        subdir = OmegaConf.to_container(plan.sweep, resolve=False)["subdir"]
        return ["-m", *own, *rest, "trainer.resume=true", f"hydra.sweep.dir={path}",
                f"hydra.sweep.subdir={subdir}"]
    raise IdmapError(f"trainer.resume={value}: not a run directory (no {hydra_overrides_path(path)}) "
                     f"nor a sweep directory (no {path / MULTIRUN})")


def _refuse_other_settings(run_dir: Path, overrides: list[str]) -> None:
    """Compares the config these overrides compose with the run's own, before Hydra writes a
    thing into the run directory, so a refused resume leaves the run as it was."""
    from idmap.config import compose_config

    saved = OmegaConf.to_container(OmegaConf.load(hydra_config_path(run_dir)), resolve=False)
    new = OmegaConf.to_container(compose_config(*overrides), resolve=False)
    changed = settings_changed(saved, new)
    if changed:
        raise IdmapError(f"{run_dir} was run with other settings ({'; '.join(changed)}); only how it "
                         f"runs may change on resuming (e.g. trainer.max_iters)")


def _already_done(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The summary of a run that a resumed sweep finds completed, so it is not loaded again."""
    try:
        summary = read_summary(run_dir)
    except ValueError:
        return None
    done = (summary["status"] == "completed" and not cfg.trainer.epochs
            and summary.get("iterations") == summary.get("max_iters") == cfg.trainer.max_iters)
    return summary if done else None


# --------------------------------------------------------------------------------------------------
# The Hydra task
# --------------------------------------------------------------------------------------------------
def main(cfg: DictConfig) -> dict | None:
    """One run in Hydra's output directory. Bad input ends a single run with one line and exit
    code 2; in a multirun a failed job is recorded in its summary.json and the sweep goes on.
    HYDRA_FULL_ERROR=1 shows tracebacks."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from idmap.gpus import pin_job_to_gpu

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:
        cfg.trainer.progress = False
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        summary = _already_done(cfg, run_dir) if cfg.trainer.resume else None
        if summary is None:
            with pin_job_to_gpu(cfg.gpu_pool) as device:
                if device is not None:
                    cfg.trainer.device = device
                summary = run(cfg, run_dir)
        if int(os.environ.get("RANK", 0)):  # one process of a group: rank 0 reports the run
            return summary
        log.info("%s: final test error %s%%", summary["status"], summary["final_test_error"])
        if multirun:
            sweep_progress(hc, summary)
        return summary
    except Interrupted as exc:
        log.warning("%s; continue with trainer.resume=%s (or the same settings, trainer.resume=true "
                    "hydra.run.dir=%s)", exc, run_dir, run_dir)
        handler = signal.getsignal(exc.signum)
        if callable(handler) and handler is not signal.default_int_handler:
            # Checkpoint saved: now let the handler we deferred (submitit's requeue) have the signal.
            signal.raise_signal(exc.signum)
        sys.exit(128 + exc.signum)
    except Exception as exc:
        if not isinstance(exc, RunExists):  # a refused start leaves the run it found as it was
            record_failure(run_dir, cfg, exc)
        if full_error or (not multirun and not isinstance(exc, IdmapError)):
            raise
        if multirun:
            log.error("job failed: %s (details in %s)", exc, run_dir / SUMMARY)
            sweep_progress(hc, {"status": "failed", "final_test_error": None})
            return None
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def record_failure(run_dir: Path, cfg: DictConfig, exc: Exception) -> None:
    with contextlib.suppress(Exception):
        update_summary(run_dir, status="failed", error=f"{type(exc).__name__}: {exc}",
                       choices=hydra_choices(), config=OmegaConf.to_container(cfg, resolve=False),
                       seed=cfg.seed, traceback=traceback.format_exc())



# --------------------------------------------------------------------------------------------------
# Sweep progress: one line per finished job
# --------------------------------------------------------------------------------------------------
def swept_values(task_overrides: list[str], sweeper_params: dict | None) -> dict[str, int]:
    """Each swept key of a basic sweep and how many values it takes (command line and the
    experiment's hydra.sweeper.params, the command line winning)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept = {k: str(v) for k, v in (sweeper_params or {}).items()}
    for o in task_overrides:
        key, _, value = o.partition("=")
        swept[key.lstrip("+~")] = value
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in swept.items()])
    return {o.get_key_element().lstrip("+~"): len(list(o.sweep_string_iterator()))
            for o in parsed if o.is_sweep_override()}


def sweep_size(task_overrides: list[str], sweeper_params: dict | None) -> int:
    """Jobs in a basic sweep: the product of the numbers of swept values."""
    return math.prod(swept_values(task_overrides, sweeper_params).values())


def sweep_progress(hc, summary: dict) -> None:
    """`job k/N <swept values>: <status> <final error>, <wall time>; ETA <time>` after each job. k
    counts the sweep's finished run directories, so it holds with parallel launchers too; the ETA
    divides the remaining jobs' mean time by how many have run side by side so far."""
    try:
        sweep = Path(hc.sweep.dir)
        plan = OmegaConf.load(sweep / MULTIRUN).hydra
        params = plan.sweeper.get("params")
        swept = swept_values(list(plan.overrides.task), OmegaConf.to_container(params) if params else {})
        total = math.prod(swept.values())
        label = " ".join(o for o in hc.overrides.task if o.partition("=")[0].lstrip("+~") in swept)
        summaries = []
        for d in sweep.iterdir():
            with contextlib.suppress(ValueError, OSError):
                s = read_summary(d)
                if s["status"] != "running":
                    summaries.append(s)
        walls = [s.get("wall_time_s") or 0.0 for s in summaries]
        since = time.time() - (sweep / MULTIRUN).stat().st_mtime
        side_by_side = max(1.0, sum(walls) / since) if since > 0 else 1.0
        left = max(0, total - len(summaries))
        eta = left * (sum(walls) / len(walls)) / side_by_side if walls else 0.0
        error = summary.get("final_test_error")
        log.info("job %d/%d %s: %s%s, %s; ETA %s", len(summaries), total, label, summary["status"],
                 "" if error is None else f" {error:.2f}%", _clock(summary.get("wall_time_s") or 0.0),
                 _clock(eta) if left else "done")
    except Exception as exc:  # progress is a courtesy: never let it fail a job
        log.debug("no sweep progress line: %s", exc)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
