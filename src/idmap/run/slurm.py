"""Sweeps on SLURM (`+launcher=slurm`): what hydra-submitit-launcher's SlurmLauncher leaves to a
traceback. What sbatch refuses ends in one line naming the launcher setting to change (exit 2);
every job of the array is waited for and collected even when some fail, also on clusters whose
accounting (sacct) is off, where submitit alone would wait for ever on a job SLURM ended; a failed
job is recorded in its summary.json, so that the sweep's end (sweep.SweepStatus) names it in one
line and exits 1.

Hydra only instantiates launchers from the hydra_plugins package, so the class Hydra sees is a
thin one in src/hydra_plugins/idmap_slurm; the behaviour lives here."""

from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from idmap.rundir import mark_failed

log = logging.getLogger("idmap")

# sbatch's refusal -> the launcher setting that asked for it, and what to do
REFUSALS = [
    ("Invalid generic resource (gres) specification", "hydra.launcher.gpus_per_node",
     "the partition has no such GPUs; on a CPU partition use +launcher=slurm_cpu "
     "(or hydra.launcher.gpus_per_node=0)"),
    ("Invalid partition name", "hydra.launcher.partition", "`sinfo -s` lists the partitions"),
    ("Requested time limit is invalid", "hydra.launcher.timeout_min",
     "it exceeds the partition's limit (`sinfo -o '%P %l'`)"),
    ("Requested node configuration is not available",
     "hydra.launcher.cpus_per_task, mem_gb, tasks_per_node or nodes",
     "no node has that much (`sinfo -N -o '%N %c %m %G'`)"),
    ("Memory specification can not be satisfied", "hydra.launcher.mem_gb",
     "no node has that much memory (`sinfo -N -o '%N %m'`)"),
    ("Invalid account", "hydra.launcher.account", "`sacctmgr show assoc user=$USER` lists yours"),
    ("Invalid qos", "hydra.launcher.qos", "`sacctmgr show qos` lists them"),
]
# SLURM states of a job that may still write its result (squeue --states=all)
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


def refusal(sbatch_error: str) -> str:
    """One line for what sbatch refused, naming the setting to change."""
    said = next((ln.strip() for ln in reversed(sbatch_error.splitlines()) if "error:" in ln), sbatch_error.strip())
    said = said.removeprefix("sbatch: error: ").removeprefix("Batch job submission failed: ")
    for phrase, setting, hint in REFUSALS:
        if phrase.lower() in sbatch_error.lower():
            return f"SLURM refused the sweep: {said}; change {setting}: {hint}"
    return f"SLURM refused the sweep: {said}; see the hydra.launcher settings (conf/launcher/slurm.yaml)"


def launch(launcher, job_overrides, initial_job_idx: int) -> list[JobReturn]:
    """hydra-submitit-launcher's launch, with submission refusals and failed jobs handled."""
    import submitit
    from hydra.core.singleton import Singleton

    executor = _executor(launcher)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:  # as hydra-submitit-launcher does
        sweep_dir.chmod(int(str(launcher.config.hydra.sweep.mode), 8))
    log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
    job_params = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    try:
        jobs = executor.map_array(launcher, *zip(*job_params))
    except submitit.core.utils.FailedJobError as exc:
        _refused(str(exc))
    ended = wait(jobs)
    returns = []
    for job, (overrides, _, idx, *_) in zip(jobs, job_params):
        try:
            if job.job_id in ended:
                raise RuntimeError(f"SLURM ended job {job.job_id} ({ended[job.job_id]}) before it wrote a "
                                   f"result; its log: {job.paths.stderr}")
            ret = job.results()[0]
            if ret.status == JobStatus.FAILED:  # the job's own exception, which Hydra's run_job caught
                raise ret._return_value
            returns.append(ret)
        except Exception as exc:  # one job's failure must not keep the others from being collected
            folder = job_folder(launcher, overrides, idx)
            reason = failure_reason(exc, launcher.params)
            if folder is not None:
                # A job SLURM ended before it made its folder gets one, so the sweep's end names it too.
                folder.mkdir(parents=True, exist_ok=True)
                mark_failed(folder, error=reason)
            log.error("job %d failed: %s", idx, reason)
    # The failed jobs are recorded in their folders: the sweep's end names each in one line and
    # exits 1 (sweep.SweepStatus), as for every launcher.
    return returns


def _executor(launcher):
    """The executor hydra-submitit-launcher builds from `hydra.launcher.*`."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = dict(launcher.params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor


def _refused(sbatch_error: str):
    import sys

    print(f"error: {refusal(sbatch_error)}", file=sys.stderr)
    sys.exit(2)


def wait(jobs, poll_s: float = 2.0) -> dict[str, str]:
    """Waits until every job has written its result or SLURM says it ended without one. Returns
    {job id: SLURM state} for the latter. submitit alone asks sacct, which clusters without
    accounting do not answer, and would then wait for ever on a job SLURM killed."""
    left, ended = {j.job_id: j for j in jobs}, {}
    while left:
        states = _queue_states()
        for job_id, job in list(left.items()):
            # its result file; or sacct where squeue does not answer (without accounting, submitit
            # warns at every sacct call)
            if job.paths.result_pickle.exists() or (states is None and job.done()):
                del left[job_id]
            elif states is not None and states.get(job_id, "no longer listed") not in ACTIVE:
                if job.paths.result_pickle.exists():  # it wrote its result as we looked
                    del left[job_id]
                    continue
                ended[job_id] = states.get(job_id, "no longer listed")
                del left[job_id]
        if left:
            time.sleep(poll_s)
    return ended


def _queue_states() -> dict[str, str] | None:
    """{job id (array tasks as 123_4): state} of this user's jobs per squeue; None if it fails."""
    try:
        out = subprocess.run(["squeue", "--me", "--array", "--states=all", "--noheader", "--format=%i|%T"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return dict(line.split("|", 1) for line in out.split() if "|" in line)


def failure_reason(exc: Exception, params: dict) -> str:
    """One line for why a job failed: the last line of its traceback, or what submitit says."""
    text = str(exc)
    if "timed-out too many times" in text:
        return (f"it reached its time limit (hydra.launcher.timeout_min={params.get('timeout_min')}) more "
                f"than hydra.launcher.max_num_timeout={params.get('max_num_timeout')} times; raise either, "
                f"then resume the sweep with trainer.resume=<sweep dir>")
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception)\b.*:", ln)]
    return lines[-1] if lines else (text.strip().splitlines() or [type(exc).__name__])[0]


def job_folder(launcher, overrides: list[str], idx: int) -> Path | None:
    """The job's run directory, as the job itself composes it (hydra.sweep.subdir)."""
    from hydra.core.hydra_config import HydraConfig

    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    try:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = idx
        HydraConfig.instance().set_config(cfg)  # the subdir reads ${hydra:runtime.choices...}
        return sweep_dir / str(cfg.hydra.sweep.subdir)
    except Exception:  # only names the job in the line; the job number says which it was
        return None
