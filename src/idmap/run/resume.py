"""Resuming by directory: `python train.py trainer.resume=DIR [settings]` becomes the command line
that continues the run or sweep in DIR, with the settings it recorded; what would change what it
computes is refused here, before Hydra writes anything into it."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from idmap import IdmapError
from idmap.rundir import (MULTIRUN, Status, check_contained, hydra_config_path, hydra_overrides_path, override_key,
                          read_hydra_config, read_overrides, read_summary, read_sweep_plan, run_dirs)
from idmap.train.state import refuse_other_settings


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
            task = composable([a for a in argv if not a.startswith("-")])
            _refuse_shortening(Path(run_dirs[-1]), _refuse_other_settings(Path(run_dirs[-1]), task))
        return argv
    if not value or value.lower() == "false":
        return argv
    path = Path(value)
    rest = [a for a in argv if not a.startswith("trainer.resume=")]
    if hydra_overrides_path(path).is_file() or hydra_config_path(path).is_file():
        return _resume_run(path, rest)  # a record that is missing or unreadable is named there
    if (path / MULTIRUN).is_file():
        return _resume_sweep(path, rest)
    raise IdmapError(f"trainer.resume={value}: not a run directory (no {hydra_overrides_path(path)}) "
                     f"nor a sweep directory (no {path / MULTIRUN})")


def composable(args: list[str]) -> list[str]:
    """The overrides that compose a run's config: Hydra's own settings stay Hydra's, but for the
    search path, where a user's block file lives."""
    return [a for a in args if not a.lstrip("+").startswith(("hydra.", "hydra/"))
            or a.lstrip("+").startswith("hydra.searchpath=")]


def recorded(overrides) -> list[str]:
    """Recorded overrides as written: values such as ${hydra.job.num} stay unresolved."""
    return OmegaConf.to_container(overrides, resolve=False)


def _last_per_key(overrides: list[str]) -> list[str]:
    """One override per key, the last given: a run resumed many times keeps a short record."""
    last = {override_key(o): o for o in overrides}
    return [o for o in overrides if last[override_key(o)] is o]


def quoted(path: Path) -> str:
    """A path as a quoted Hydra override value: commas, brackets or '=' in it stay part of it."""
    return "'" + str(path).replace("'", "\\'") + "'"


def _resume_run(path: Path, rest: list[str]) -> list[str]:
    if any(a in ("-m", "--multirun") for a in rest):
        raise IdmapError(f"{path} is one run: resume it without -m (or resume its sweep directory)")
    own = _replayed(read_overrides(path), hydra_overrides_path(path))
    args = _last_per_key([*own, *rest, "trainer.resume=true"])
    given = {override_key(a): a.partition("=")[2] for a in rest}
    epochs = given.get("trainer.epochs", (read_hydra_config(path).get("trainer") or {}).get("epochs"))
    if epochs not in (None, "null") and "trainer.max_iters" in given:  # said before the config's own rule
        raise IdmapError(f"{path} counts its length in epochs (trainer.epochs={epochs}); extend it with "
                         f"trainer.epochs=N")
    new = _refuse_other_settings(path, composable(args))
    _refuse_shortening(path, new)
    # hydra.mode=RUN: a job of an experiment sweep (+experiment=... sets MULTIRUN) resumes as one run.
    return [*args, "hydra.mode=RUN", f"hydra.run.dir={quoted(path)}"]


def _resume_sweep(path: Path, rest: list[str]) -> list[str]:
    plan = read_sweep_plan(path)
    rest = [a for a in rest if a not in ("-m", "--multirun")]
    changed = [a for a in rest if not _runs_differently(a)]
    if changed:
        raise IdmapError(f"{', '.join(changed)} would change what the runs of {path} compute; only how "
                         f"they run may change on resuming (e.g. trainer.max_iters)")
    overrides = plan["overrides"]
    own = _replayed(overrides["task"], path / MULTIRUN)
    # The sweep's own launcher settings (partition, account, n_jobs, ...) and job folder names.
    launcher = _replayed([o for o in overrides["hydra"] if not o.startswith(("hydra.sweep.", "hydra.run.",
                                                                              "hydra.mode"))], path / MULTIRUN)
    subdir = str(plan["sweep"]["subdir"])
    if not _SUBDIR.fullmatch(subdir):  # a job folder of ../.. would be written outside the sweep
        raise IdmapError(f"{path / MULTIRUN}: hydra.sweep.subdir {subdir!r} is not a job folder name "
                         f"(letters, digits, _.- and ${{hydra.job.num}}, ${{hydra:runtime.choices.GROUP}})")
    for folder in [path, *(d for d in run_dirs([path]) if d != path)]:  # Hydra writes in them first
        check_contained(folder)
    return ["-m", *_last_per_key([*own, *launcher, *rest, "trainer.resume=true"]),
            f"hydra.sweep.dir={quoted(path)}", f"hydra.sweep.subdir={subdir}"]


# Names a sweep's job folders may have: the job's number and group choices (which are names).
_SUBDIR = re.compile(r"(?!\.)([\w.-]|\$\{hydra\.job\.(num|id)\}|\$\{hydra:runtime\.choices\.\w+\})+")


def _replayed(overrides: list[str], record: Path) -> list[str]:
    """A record's overrides to replay, but a resume it asked for: only this project's settings,
    as overrides.check_overrides allows a record (IdmapError naming the file otherwise)."""
    from idmap.overrides import check_overrides

    check_overrides(overrides, record)
    return [o for o in overrides if not o.startswith("trainer.resume=")]


def _runs_differently(override: str) -> bool:
    """Whether an override only changes how runs run (config.Role.RESUMABLE; Hydra's own settings
    and the launcher too: e.g. resume on SLURM instead)."""
    from idmap.config import Role, has_role

    return has_role(override_key(override), Role.RESUMABLE)


def _refuse_other_settings(run_dir: Path, overrides: list[str]) -> dict:
    """The config these overrides compose, compared with the run's own before Hydra writes a thing
    into the run directory, so a refused resume leaves the run as it was."""
    from idmap.config import compose_checked

    saved = read_hydra_config(run_dir)
    new = OmegaConf.to_container(compose_checked(*overrides), resolve=False)
    refuse_other_settings(run_dir, saved, new)
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


def already_done(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The summary of a run that a resumed sweep finds finished (completed at this length or
    beyond, or diverged), so that it is not loaded, nor a diverged run given a second chance."""
    try:
        summary = read_summary(run_dir)
    except ValueError:
        return None
    # A run already past this length (extended on its own) is done too: resuming never shortens.
    # A length in epochs is compared in epochs (its iterations depend on the data set's size).
    t, ran = cfg.trainer, ((summary.get("config") or {}).get("trainer") or {})
    long_enough = ((ran.get("epochs") or 0) >= t.epochs if t.epochs
                   else (summary.get("iterations") or 0) >= t.max_iters)
    completed = summary["status"] == Status.COMPLETED and long_enough
    return summary if completed or summary["status"] == Status.DIVERGED else None
