"""The edge where runs start: the Hydra task (exit codes) and process groups (spawned, torchrun,
SLURM tasks), GPU pinning. Below this module everything takes a plain config; resuming by
directory is resume.py's, sweep bookkeeping sweep_status.py's."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from idmap import IdmapError, report_failure
from idmap.config import check_config, checked
from idmap.run.resume import already_done, composable, quoted
from idmap.rundir import (HYDRA_DIR, HYDRA_LOG, MULTIRUN, SUMMARY, DiskFull, Status, RunInUse, check_contained,
                          checkpoint_path, has_lock_file, holds_lock, lock_run_dir, read_summary, results_held,
                          run_dirs, unlock_run_dir, write_hydra_record)
from idmap.train.checkpoint import load_checkpoint
from idmap.train.runtime import Interrupted, resolve_device
from idmap.train.state import RunExists, refuse_checkpoint_without_resume
from idmap.run.sweep_status import clear_failed_resume, note_failed_resume, record_failure, sweep_progress
from idmap.train.trainer import train

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


def _spawned(rank: int, world_size: int, cfg_dict: dict, run_dir: str, port: int, choices: dict,
             on_start=None) -> None:
    cfg = OmegaConf.create(cfg_dict)
    _start_group(cfg.trainer.device, rank, rank, world_size, f"tcp://127.0.0.1:{port}")
    try:
        train(cfg, run_dir, rank, world_size, choices, on_start)
    except BaseException as exc:
        dist.destroy_process_group()
        if isinstance(exc, Interrupted):  # checkpointed; the parent reads the summary
            return
        raise  # mp.spawn reports it
    dist.barrier()  # no rank tears its group down while a peer still talks to it
    dist.destroy_process_group()
    # A child that trained to the end leaves without the interpreter's teardown: on CI's 2-core
    # machine a finished rank once aborted ("terminate called without an active exception", most
    # likely gloo's threads destroyed there), which mp.spawn turns into a failed run. Every file is
    # closed by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(cfg: DictConfig, run_dir: Path, choices: dict, on_start=None) -> dict:
    """`trainer.world_size` data-parallel processes on this machine, one run directory."""
    import socket

    import torch.multiprocessing as mp

    from idmap.train.data import load_dataset

    world_size = cfg.trainer.world_size
    if resolve_device(cfg.trainer.device).type == "cuda" and world_size > torch.cuda.device_count():
        raise IdmapError(_shared_gpu(world_size, torch.cuda.device_count()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_dataset(cfg.dataset)  # fetch (or decode and cache) once here, so the ranks do not race
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    mp.spawn(_spawned, args=(world_size, cfg_dict, str(run_dir), port, choices, on_start), nprocs=world_size,
             join=True)
    summary = read_summary(run_dir)
    if summary["status"] == Status.INTERRUPTED:
        raise Interrupted(signal.SIGTERM)
    return summary


def _in_group(cfg: DictConfig, run_dir: Path, choices: dict, group: tuple[int, int, int], on_start=None) -> dict:
    """This process is one rank of a group a launcher started (torchrun, SLURM tasks). Rank 0's run
    directory is everyone's: each process composed its own, and time-stamped names may differ."""
    rank, local_rank, world_size = group
    if cfg.trainer.world_size not in (1, world_size):
        raise IdmapError(f"trainer.world_size={cfg.trainer.world_size} but the launcher started "
                         f"{world_size} processes; leave trainer.world_size at 1 under torchrun")
    cfg.trainer.world_size = world_size  # so the batch is checked to divide, and recorded
    check_config(cfg)  # before a GPU is taken or the group waits for its other ranks
    _start_group(cfg.trainer.device, rank, local_rank, world_size, "env://")
    try:
        if local_rank == 0:  # one process per node fetches (or decodes and caches) the data
            from idmap.train.data import load_dataset

            load_dataset(cfg.dataset)
        dist.barrier()
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        if rank and not _same_dir(shared[0], run_dir):
            _remove_stray(run_dir)
            run_dir = Path(shared[0])
        return train(cfg, run_dir, rank, world_size, choices, on_start)
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


def run(cfg: DictConfig, run_dir: str | Path, choices: dict | None = None, on_start=None) -> dict:
    """Train one run: in this process, in the process group a launcher started, or in
    `trainer.world_size` processes spawned here. Returns the summary. The run directory is this
    run's alone while it runs: rank 0 (or the process that spawns the ranks) holds its lock.
    `on_start`: called by rank 0 once the trainer has accepted the start (trainer.train)."""
    run_dir, choices = Path(run_dir), hydra_choices() if choices is None else choices
    # Checked before the directory is claimed, a GPU taken or processes spawned (once: the Hydra task
    # has checked it; a run started from Python may not have).
    checked(cfg, choices)
    group = external_group()
    owner = not group or group[0] == 0
    locked = claim(run_dir, bool(cfg.trainer.resume)) if owner else False
    try:
        if group:
            return _in_group(cfg, run_dir, choices, group, on_start)
        if cfg.trainer.world_size > 1:
            return _spawn(cfg, run_dir, choices, on_start)
        return train(cfg, run_dir, choices=choices, on_start=on_start)
    except DiskFull as exc:  # what to do next depends on what the run has written
        raise DiskFull(f"{exc}, {next_step(run_dir)}") from exc
    finally:
        if locked:
            unlock_run_dir(run_dir)


# --------------------------------------------------------------------------------------------------
# One run per run directory
# --------------------------------------------------------------------------------------------------
def claim(run_dir: Path, resume: bool) -> bool:
    """Takes `run_dir` for this process (True when newly taken), or refuses, leaving it as it was: a
    folder in use by another run, or holding a run that this start cannot continue (a checkpoint
    without trainer.resume, or one that cannot be read; results without a checkpoint to continue
    them from)."""
    if Path(run_dir).exists() and not Path(run_dir).is_dir():  # (else taken for a checkpoint file)
        raise RunExists(f"{run_dir} is a file, not a run directory; choose another run directory")
    try:
        check_contained(run_dir)  # a link that leads out of it would carry a write elsewhere
    except IdmapError as exc:
        raise RunExists(str(exc)) from None
    if not has_lock_file(run_dir):  # checked before the lock file is made: a refusal creates nothing
        _refuse_overwrite(run_dir, resume)
    if resume and checkpoint_path(run_dir).is_file() and not holds_lock(run_dir):  # (else read already)
        load_checkpoint(run_dir)  # readable: a refusal comes before a log line is written into the run
    taken = lock_run_dir(run_dir)
    try:
        _refuse_overwrite(run_dir, resume)  # again: a run may have ended here since
    except RunExists:
        if taken:
            unlock_run_dir(run_dir)
        raise
    return taken


def _refuse_overwrite(run_dir: Path, resume: bool) -> None:
    if checkpoint_path(run_dir).is_file():
        if not resume:
            refuse_checkpoint_without_resume(run_dir)
        return
    held = results_held(run_dir) if Path(run_dir).is_dir() else None
    if held:
        raise RunExists(f"{run_dir} holds a run's results ({held}) but no checkpoint to continue it from; "
                        f"it is left as it was: restore its checkpoint to continue it, or choose another "
                        f"run directory")


def next_step(run_dir: Path) -> str:
    """What a run stopped by its environment (a full disk) should do next, from what it wrote."""
    if checkpoint_path(run_dir).is_file():
        return f"then continue it with trainer.resume={run_dir}"
    if results_held(run_dir):  # refused without a checkpoint: a run's results are never overwritten
        return "then start it again in another run directory (it wrote no checkpoint to continue from)"
    return "then start it again"


def check_can_make(folder: Path, setting: str) -> None:
    """IdmapError naming `setting` unless `folder` exists or can be made: its nearest existing
    ancestor a writable folder, each name short enough. Nothing is made."""
    path = Path(folder).absolute()
    why = next((f"the name {p[:40]}... is too long" for p in path.parts if len(os.fsencode(p)) > 255), None)
    ancestor = path
    while why is None and not ancestor.exists():
        ancestor = ancestor.parent
    if why is None and not ancestor.is_dir():
        why = f"{ancestor} is not a folder"
    elif why is None and not os.access(ancestor, os.W_OK | os.X_OK):
        why = f"{ancestor} cannot be written"
    if why:
        raise IdmapError(f"cannot make {folder} ({why}); choose another {setting}")


def _resumes(argv: list[str]) -> bool:
    """Whether a sweep's jobs resume: trainer.resume as its settings compose it (conf/launcher/slurm
    sets it), the swept values left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from idmap.config import compose_config

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        return bool(compose_config(*composable(fixed)).trainer.resume)
    except Exception:  # a setting Hydra cannot compose: Hydra says so when the sweep starts
        return True


def _refuse_held_sweep(sweep_dir: Path) -> None:
    """A new sweep into the folder of one whose jobs hold runs is refused before Hydra or a job
    writes there: its job folders (numbered from 0 again) would be those runs' (each refused, with
    Hydra's log lines and a failure record added to it). That sweep is continued with trainer.resume."""
    if not (Path(sweep_dir) / MULTIRUN).is_file():  # not a sweep's folder: each job checks its own
        return
    for run_dir in run_dirs([sweep_dir]):
        held = "a checkpoint" if checkpoint_path(run_dir).is_file() else results_held(run_dir)
        if held:
            raise RunExists(f"hydra.sweep.dir={sweep_dir} already holds a sweep's runs ({run_dir.name}: {held}); "
                            f"continue it with trainer.resume={sweep_dir}, or choose another hydra.sweep.dir "
                            f"(it is left as it was)")


def before_hydra(argv: list[str]) -> list[str]:
    """A single run's settings checked, and its run directory resolved (${now:...} included) and
    claimed, before Hydra composes and writes there: bad input is one line, and a refused start
    leaves the folder as it was. Returns the command line with that folder as hydra.run.dir, so
    that Hydra uses the one claimed; the lock stays held for the life of this process (the Hydra
    task finds it held). A sweep's folder is checked to be makeable and, unless the sweep resumes,
    to hold no runs: its jobs check and claim their own."""
    from idmap.config import compose_checked, compose_config, hydra_path

    flags = {a for a in argv if a.startswith("-")}
    if flags - {"-m", "--multirun"} or int(os.environ.get("RANK", 0)):
        return argv  # --help, --cfg ...: Hydra's; rank > 0 of a group: rank 0 checks and claims
    # An experiment is a sweep (hydra.mode=MULTIRUN) unless told otherwise.
    if flags or (any(a.lstrip("+").startswith("experiment=") for a in argv) and "hydra.mode=RUN" not in argv):
        sweep_dir = hydra_path(compose_config(*[a for a in argv if a.startswith("hydra.sweep.dir=")], hydra=True),
                               "hydra.sweep.dir")
        if sweep_dir is not None:
            check_can_make(sweep_dir, "hydra.sweep.dir")
            if not _resumes(argv):
                _refuse_held_sweep(sweep_dir)
        return argv
    named = [a for a in argv if a.startswith("hydra.run.dir=")]
    cfg = compose_checked(*composable(argv), *named[-1:], hydra=True)
    run_dir = hydra_path(cfg, "hydra.run.dir")
    if run_dir is None:  # an interpolation only Hydra's job can resolve: the job claims it
        return argv
    claim(run_dir, bool(cfg.trainer.resume))
    return [*[a for a in argv if a not in named], f"hydra.run.dir={quoted(run_dir)}"]


# --------------------------------------------------------------------------------------------------
# The Hydra task
# --------------------------------------------------------------------------------------------------
def main(cfg: DictConfig) -> dict | None:
    """One run in Hydra's output directory. Bad input ends a single run with one line and exit
    code 2; in a multirun a failed job is recorded in its summary.json and the sweep goes on.
    HYDRA_FULL_ERROR=1 shows tracebacks."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from idmap.run.gpu_pool import pin_job_to_gpu

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    # hydra.output_subdir is null: the run's .hydra/ record is written once the trainer has accepted
    # the start (rundir.write_hydra_record), with the texts Hydra would have written by now.
    record = functools.partial(write_hydra_record, run_dir, OmegaConf.to_yaml(cfg),
                               OmegaConf.to_yaml(HydraConfig.instance().cfg), OmegaConf.to_yaml(hc.overrides.task))
    if multirun:
        cfg.trainer.progress = False
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    reports = not int(os.environ.get("RANK", 0))  # one process of a group: rank 0 reports the run
    try:
        # A sweep's job, or a run started from Python: before anything is written, a GPU is pinned
        # or processes are spawned.
        check_config(cfg, hydra_choices())
        summary = already_done(cfg, run_dir) if cfg.trainer.resume else None
        if summary is not None:
            clear_failed_resume(run_dir, summary)
            log.info("%s already %s: not run again", run_dir, summary["status"])
            return summary
        with pin_job_to_gpu(cfg.gpu_pool) as device:
            if device is not None:
                cfg.trainer.device = device
            summary = run(cfg, run_dir, on_start=record)
        if not reports:
            return summary
        log.info("%s: final test error %s%%", summary["status"], summary["final_test_error"])
        if multirun:
            sweep_progress(hc, summary)  # a diverged job is counted at the sweep's end (sweep_status.py)
        elif summary["status"] != Status.COMPLETED:  # ran, but no result: 1, as for any failed run
            print(f"error: {run_dir} {summary['status']}: {summary.get('error')}; it has no result",
                  file=sys.stderr)
            sys.exit(1)
        return summary
    except Interrupted as exc:
        if not reports:  # rank 0 reports it and hands the signal to submitit
            return None
        log.warning("%s; continue with trainer.resume=%s (or the same settings, trainer.resume=true "
                    "hydra.run.dir=%s)", exc, run_dir, run_dir)
        handler = signal.getsignal(exc.signum)
        if callable(handler) and handler is not signal.default_int_handler:
            # Checkpoint saved: now let the handler we deferred (submitit's requeue) have the signal.
            signal.raise_signal(exc.signum)
        sys.exit(128 + exc.signum)
    except Exception as exc:
        refused = isinstance(exc, (RunExists, RunInUse))
        if not refused:  # a refused start leaves the run it found as it was
            record_failure(run_dir, cfg, exc, hydra_choices())
        if multirun and not isinstance(exc, RunInUse):  # a completed job not continued: the sweep's end says so
            note_failed_resume(run_dir, exc)
        if full_error:
            raise
        if multirun:
            log.error("job %s: %s (%s)", Status.REFUSED if refused else Status.FAILED, exc,
                      "the run is left as it was" if refused else f"details in {run_dir / SUMMARY}")
            sweep_progress(hc, {"status": Status.REFUSED if refused else Status.FAILED, "final_test_error": None})
            return None
        sys.exit(report_failure(exc, f"details in {run_dir / SUMMARY}; HYDRA_FULL_ERROR=1 shows the traceback"))
