"""The edge where runs start: the Hydra task, process groups (spawned, torchrun, SLURM tasks), GPU
pinning, exit codes and failure records. Below this module everything takes a plain config."""

from __future__ import annotations

import contextlib
import inspect
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
from idmap.state import RESUMABLE, RunExists, settings_changed
from idmap.trainer import train, validate

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
        with contextlib.suppress(ImportError):
            import submitit

            if submitit.JobEnvironment().num_tasks > 1:
                # overwrite: a MASTER_PORT or WORLD_SIZE left in the environment must not make the
                # tasks train as N separate copies into one directory.
                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                      overwrite=True)
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _start_group(device_name: str, rank: int, local_rank: int, world_size: int, init_method: str) -> None:
    use_cuda = resolve_device(device_name).type == "cuda"
    bind = {}
    if use_cuda:
        count = torch.cuda.device_count()
        # Processes that all see the node's GPUs (torchrun; _spawn checks its own) need one each;
        # where the scheduler shows each process only its own (SLURM's --gpus-per-task) it is
        # device 0. Any other sharing NCCL finds as the communicator forms (device_id).
        if local_rank >= count and os.environ.get("TORCHELASTIC_RUN_ID"):
            raise IdmapError(_shared_gpu(local_rank + 1, count))
        device = torch.device("cuda", local_rank % count)
        torch.cuda.set_device(device)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:  # torch >= 2.3
            bind = dict(device_id=device)  # NCCL forms its communicator now, on this GPU
    else:  # CPU processes share the node's cores rather than each taking all of them
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    try:
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method, rank=rank,
                                world_size=world_size, **bind)
    except RuntimeError as exc:  # DistBackendError; torch.distributed names it only from 2.1
        if "Duplicate GPU" not in str(exc):
            raise
        raise IdmapError(_shared_gpu(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), count)) from None


def _shared_gpu(processes: int, gpus: int) -> str:
    return (f"{processes} processes on this node but {gpus} GPU(s): NCCL cannot put two ranks on one GPU; "
            f"start at most {gpus} per node (trainer.world_size, torchrun --nproc-per-node, or SLURM "
            f"--ntasks-per-node), or give each task its own GPU (--gpus-per-task=1)")


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

    world_size = cfg.trainer.world_size
    validate(cfg)  # a bad value is one line here, not a traceback from every child process
    if resolve_device(cfg.trainer.device).type == "cuda" and world_size > torch.cuda.device_count():
        raise IdmapError(_shared_gpu(world_size, torch.cuda.device_count()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_dataset(cfg.dataset)  # fetch (or decode and cache) once here, so the ranks do not race
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
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
    cfg.trainer.world_size = world_size  # so the batch is checked to divide, and recorded
    validate(cfg)  # before a GPU is taken or the group waits for its other ranks
    _start_group(cfg.trainer.device, rank, local_rank, world_size, "env://")
    try:
        if local_rank == 0:  # one process per node fetches (or decodes and caches) the data
            from idmap.data import load_dataset

            load_dataset(cfg.dataset)
        dist.barrier()
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        if rank and not _same_dir(shared[0], run_dir):
            _remove_stray(run_dir)
            run_dir = Path(shared[0])
        return train(cfg, run_dir, rank, world_size, choices)
    finally:
        dist.destroy_process_group()


def _same_dir(a: str | Path, b: str | Path) -> bool:
    """Two spellings of one folder (a symlink, a relative path) are the same run directory."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


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
    overrides (from its .hydra/ or the sweep's multirun.yaml), then the user's other arguments,
    which may change how it runs (e.g. raise trainer.max_iters) but not what it computes; those are
    refused here, before Hydra writes anything. Other command lines pass through unchanged."""
    given = [a for a in argv if a.startswith("trainer.resume=")]
    value = given[-1].split("=", 1)[1].strip("'\"") if given else ""
    if value.lower() == "true":  # the long form: the same checks, before Hydra writes into the run
        run_dirs = [a.split("=", 1)[1].strip("'\"") for a in argv if a.startswith("hydra.run.dir=")]
        if run_dirs and hydra_config_path(Path(run_dirs[-1])).is_file() and not {"-m", "--multirun"} & set(argv):
            task = [a for a in argv if not a.startswith(("-", "hydra.", "+hydra.", "hydra/"))]
            _refuse_shortening(Path(run_dirs[-1]), _refuse_other_settings(Path(run_dirs[-1]), task))
        return argv
    if not value or value.lower() == "false":
        return argv
    path = Path(value)
    rest = [a for a in argv if not a.startswith("trainer.resume=")]
    if hydra_overrides_path(path).is_file():
        return _resume_run(path, rest)
    if (path / MULTIRUN).is_file():
        return _resume_sweep(path, rest)
    raise IdmapError(f"trainer.resume={value}: not a run directory (no {hydra_overrides_path(path)}) "
                     f"nor a sweep directory (no {path / MULTIRUN})")


def _strings(overrides) -> list[str]:
    """Recorded overrides as written: values such as ${hydra.job.num} stay unresolved."""
    return OmegaConf.to_container(overrides, resolve=False)


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _last_per_key(overrides: list[str]) -> list[str]:
    """One override per key, the last given: a run resumed many times keeps a short record."""
    last = {_key(o): o for o in overrides}
    return [o for o in overrides if last[_key(o)] is o]


def _quoted(path: Path) -> str:
    """A path as a quoted Hydra override value: commas, brackets or '=' in it stay part of it."""
    return "'" + str(path).replace("'", "\\'") + "'"


def _resume_run(path: Path, rest: list[str]) -> list[str]:
    if any(a in ("-m", "--multirun") for a in rest):
        raise IdmapError(f"{path} is one run: resume it without -m (or resume its sweep directory)")
    own = [o for o in _strings(OmegaConf.load(hydra_overrides_path(path)))
           if not o.startswith("trainer.resume=")]
    args = _last_per_key([*own, *rest, "trainer.resume=true"])
    task = [a for a in args if not a.startswith(("hydra.", "+hydra.", "hydra/"))]
    new = _refuse_other_settings(path, task)
    if new["trainer"].get("epochs") and any(_key(a) == "trainer.max_iters" for a in rest):
        raise IdmapError(f"{path} counts its length in epochs (trainer.epochs={new['trainer']['epochs']}); "
                         f"extend it with trainer.epochs=N")
    _refuse_shortening(path, new)
    # hydra.mode=RUN: a job of an experiment sweep (+experiment=... sets MULTIRUN) resumes as one run.
    return [*args, "hydra.mode=RUN", f"hydra.run.dir={_quoted(path)}"]


def _resume_sweep(path: Path, rest: list[str]) -> list[str]:
    plan = OmegaConf.load(path / MULTIRUN).hydra
    rest = [a for a in rest if a not in ("-m", "--multirun")]
    changed = [a for a in rest if not _runs_differently(a)]
    if changed:
        raise IdmapError(f"{', '.join(changed)} would change what the runs of {path} compute; only how "
                         f"they run may change on resuming (e.g. trainer.max_iters)")
    overrides = _strings(plan.overrides)
    own = [o for o in overrides["task"] if not o.startswith("trainer.resume=")]
    # The sweep's own launcher settings (partition, account, n_jobs, ...) and job folder names.
    launcher = [o for o in overrides["hydra"] if not o.startswith(("hydra.sweep.", "hydra.run.", "hydra.mode"))]
    subdir = OmegaConf.to_container(plan.sweep, resolve=False)["subdir"]
    return ["-m", *_last_per_key([*own, *launcher, *rest, "trainer.resume=true"]),
            f"hydra.sweep.dir={_quoted(path)}", f"hydra.sweep.subdir={subdir}"]


def _runs_differently(override: str) -> bool:
    """Whether an override only changes how runs run (state.RESUMABLE; Hydra's own settings)."""
    key = _key(override)
    if key.startswith(("hydra.", "hydra/")) or key == "launcher":  # e.g. resume on SLURM instead
        return True
    section, _, name = key.partition(".")
    free = RESUMABLE.get(section, set())
    return free is None or name in free


def _refuse_other_settings(run_dir: Path, overrides: list[str]) -> dict:
    """The config these overrides compose, compared with the run's own before Hydra writes a thing
    into the run directory, so a refused resume leaves the run as it was."""
    from idmap.config import compose_config

    saved = OmegaConf.to_container(OmegaConf.load(hydra_config_path(run_dir)), resolve=False)
    new = OmegaConf.to_container(compose_config(*overrides), resolve=False)
    changed = settings_changed(saved, new)
    if changed:
        raise IdmapError(f"{run_dir} was run with other settings ({'; '.join(changed)}); only how it "
                         f"runs may change on resuming (e.g. trainer.max_iters)")
    return new


def _refuse_shortening(run_dir: Path, new: dict) -> None:
    t = new["trainer"]
    try:
        done = read_summary(run_dir).get("iterations") or 0
    except ValueError:
        return  # no summary yet: the trainer checks against the checkpoint
    if t.get("epochs"):
        return
    if t["max_iters"] < done:
        raise IdmapError(f"{run_dir} is at iteration {done} already; trainer.max_iters "
                         f"({t['max_iters']}) can be raised to extend a run, not lowered")


def _already_done(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The summary of a run that a resumed sweep finds finished (completed at this length or
    beyond, or diverged), so that it is not loaded, nor a diverged run given a second chance."""
    try:
        summary = read_summary(run_dir)
    except ValueError:
        return None
    # A run already past this length (extended on its own) is done too: resuming never shortens.
    completed = (summary["status"] == "completed" and not cfg.trainer.epochs
                 and (summary.get("iterations") or 0) >= cfg.trainer.max_iters)
    return summary if completed or summary["status"] == "diverged" else None


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
        if summary is not None:
            log.info("%s already %s: not run again", run_dir, summary["status"])
            return summary
        validate(cfg)  # before a GPU is pinned or processes are spawned
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
        if int(os.environ.get("RANK", 0)):  # rank 0 reports it and hands the signal to submitit
            return None
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
            refused = isinstance(exc, RunExists)
            log.error("job %s: %s (%s)", "refused" if refused else "failed", exc,
                      "the run is left as it was" if refused else f"details in {run_dir / SUMMARY}")
            sweep_progress(hc, {"status": "refused" if refused else "failed", "final_test_error": None})
            return None
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def record_failure(run_dir: Path, cfg: DictConfig, exc: Exception) -> None:
    """Marks the run failed in its summary.json, unless it completed: a later mistake (a resume with
    a bad setting) must not turn a finished result into a failure."""
    with contextlib.suppress(ValueError):
        if read_summary(run_dir)["status"] == "completed":
            return
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


def sweep_progress(hc, summary: dict) -> None:
    """`job k/N <swept values>: <status> <final error>, <wall time>; ETA <time>` after each job. k
    counts the sweep's finished run directories, so it holds with parallel launchers too; the ETA
    divides the remaining jobs' mean time by how many have run side by side so far."""
    try:
        sweep = Path(hc.sweep.dir)
        plan = OmegaConf.load(sweep / MULTIRUN).hydra
        params = plan.sweeper.get("params")
        task = _strings(plan.overrides)["task"]
        swept = swept_values(task, OmegaConf.to_container(params, resolve=False) if params else {})
        total = math.prod(swept.values())
        label = " ".join(o for o in _strings(hc.overrides.task) if _key(o) in swept)
        started = (sweep / MULTIRUN).stat().st_mtime  # this (re)start of the sweep
        finished, recent = 0, []  # recent: wall times of jobs finished since the (re)start
        for d in sweep.iterdir():
            with contextlib.suppress(ValueError, OSError):
                s = read_summary(d)
                if s["status"] != "running":
                    finished += 1
                    if (d / SUMMARY).stat().st_mtime >= started:
                        recent.append(s.get("wall_time_s") or 0.0)
        since = time.time() - started
        side_by_side = max(1.0, sum(recent) / since) if since > 0 else 1.0
        left = max(0, total - finished)
        eta = left * (sum(recent) / len(recent)) / side_by_side if recent else 0.0
        error = summary.get("final_test_error")
        log.info("job %d/%d %s: %s%s, %s; ETA %s", finished, total, label, summary["status"],
                 "" if error is None else f" {error:.2f}%", _clock(summary.get("wall_time_s") or 0.0),
                 _clock(eta) if left else "done")
    except Exception as exc:  # progress is a courtesy: never let it fail a job
        log.debug("no sweep progress line: %s", exc)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
