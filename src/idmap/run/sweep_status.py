"""Sweep bookkeeping: a progress line per finished job, the failure record a failed job leaves in
its summary.json, and the sweep's exit status, read back from the job folders."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from idmap.run.resume import recorded
from idmap.rundir import (MULTIRUN, SUMMARY, Status, mark_failed, override_key, read_summary, read_sweep_plan, run_dirs,
                          update_summary, write_summary)

log = logging.getLogger("idmap")


def record_failure(run_dir: Path, cfg: DictConfig, exc: Exception, choices: dict) -> None:
    """The failure in the run's summary.json (rundir.mark_failed: a completed run stays completed)."""
    with contextlib.suppress(Exception):  # recording must not hide the failure being recorded
        mark_failed(run_dir, error=f"{type(exc).__name__}: {exc}", choices=choices,
                    config=OmegaConf.to_container(cfg, resolve=False), seed=cfg.seed,
                    traceback=traceback.format_exc())


def note_failed_resume(run_dir: Path, exc: Exception) -> None:
    """A completed job that a resumed sweep could not continue (a checkpoint that does not fit, other
    settings) keeps its result, with the failure beside it (`failed_resume`), so that the sweep's
    end names it (failed_jobs); the job's next completed start writes a summary without it."""
    with contextlib.suppress(Exception):  # recording must not hide the failure being recorded
        if read_summary(run_dir)["status"] == Status.COMPLETED:
            update_summary(run_dir, failed_resume=f"{type(exc).__name__}: {exc}")


def clear_failed_resume(run_dir: Path, summary: dict) -> None:
    """A start that found the job done (resume.already_done) did not fail it: an earlier start's
    note goes, so that the sweep's end no longer names the job."""
    if summary.get("failed_resume"):
        with contextlib.suppress(Exception):  # a courtesy to the sweep's end: never fail the job for it
            write_summary(run_dir, {k: v for k, v in summary.items() if k != "failed_resume"})


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
        plan = read_sweep_plan(sweep)
        swept = swept_values(plan["overrides"]["task"], (plan.get("sweeper") or {}).get("params") or {})
        total = math.prod(swept.values())
        label = " ".join(o for o in recorded(hc.overrides.task) if override_key(o) in swept)
        started = (sweep / MULTIRUN).stat().st_mtime  # this (re)start of the sweep
        finished, recent = 0, []  # recent: wall times of jobs finished since the (re)start
        for d in sweep.iterdir():
            with contextlib.suppress(ValueError, OSError):
                s = read_summary(d)
                if s["status"] != Status.RUNNING:
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


# --------------------------------------------------------------------------------------------------
# The sweep's exit status
# --------------------------------------------------------------------------------------------------
def failed_jobs(sweep_dir: str | Path) -> list[tuple[Path, str]]:
    """(job folder, one-line reason) for every job of the sweep in `sweep_dir` that gave no result:
    its summary.json is missing or unreadable, its status is not "completed" (failed, diverged,
    interrupted, refused), or a resume of it failed (note_failed_resume). Read from the folders,
    not from this process, so it holds for every launcher, jobs that ran on other machines (SLURM)
    and jobs of earlier starts of the sweep."""
    sweep_dir = Path(sweep_dir)
    out = []
    for job in run_dirs([sweep_dir]):
        if job == sweep_dir:
            continue
        try:
            summary = read_summary(job)
        except ValueError as exc:
            out.append((job, f"no result recorded ({exc})"))
            continue
        if summary["status"] != Status.COMPLETED:
            error = str(summary.get("error") or "").strip().splitlines()
            out.append((job, summary["status"] + (f": {error[0]}" if error else "")))
        elif summary.get("failed_resume"):  # its earlier result stands, but the sweep's last start failed it
            error = str(summary["failed_resume"]).strip().splitlines() or [""]
            out.append((job, f"completed at iteration {summary.get('iterations')}, but resuming it failed: "
                             f"{error[0]}"))
    return out


class SweepStatus(Callback):
    """Hydra callback (conf/train.yaml, hydra.callbacks): once every job of a multirun has run, one
    line per failed job and exit status 1, so that a script (or a night's sweep) can trust the
    exit status."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failed = failed_jobs(config.hydra.sweep.dir)
        for job, reason in failed:
            print(f"failed: {job}: {reason}", file=sys.stderr)
        if failed:
            sys.exit(1)
