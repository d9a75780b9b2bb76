"""What a sweep will cost before it runs: `idmap-plan <the overrides of train.py -m>`.

The jobs are Hydra's own: the config is composed in multirun mode with the Compose API and the
sweeper it names (the basic sweeper, hydra.sweeper.params of an experiment included) expands it,
with a launcher that only records the jobs, so the list is exactly what `train.py -m` would run,
in its order. Each job's config is composed as train.py would, and each distinct model (what
sets the speed of a step: model, shortcut, image size, batch, precision, compile, ...) is timed
with the trainer's own build and Loop.step on the current device, after warm-up steps that are
not counted (cuDNN autotuning, torch.compile). The step's cost does not depend on pixel values,
so it is timed on synthetic images of the data set's size and classes.

Printed per job and in total: iterations, minutes, GPU-hours (training steps only: evaluations and
start-up come on top), and the hydra.launcher.timeout_min (+launcher=slurm) that covers the
slowest job with a margin.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from omegaconf import OmegaConf, open_dict

from idmap import IdmapError, cli
from idmap.config import Role, check_config, quote_numeric_choices, register_configs, with_role
from idmap.overrides import check_overrides
from idmap.paths import CONF
# The slowest job's time x MARGIN + SLACK_MIN: evaluations, start-up and a slower node.
MARGIN, SLACK_MIN = 1.25, 10
# Training images of the data sets whose size the config does not say (epochs -> iterations).
TRAIN_IMAGES = 50_000


@dataclass
class Job:
    num: int
    overrides: List[str]
    iterations: int = 0
    seconds_per_iter: float = math.nan
    gpus: int = 1

    @property
    def minutes(self) -> float:
        return self.iterations * self.seconds_per_iter / 60

    @property
    def gpu_hours(self) -> float:
        return self.minutes * self.gpus / 60


def expand(overrides: Sequence[str]) -> List[tuple]:
    """The jobs `train.py -m OVERRIDES` runs, by Hydra's own sweeper, in its order: each as
    (its overrides, its config as the task would get it, resolved, the GPUs it holds)."""
    from hydra import initialize_config_dir
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.plugins import Plugins
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import HydraContext, RunMode

    jobs: List[tuple] = []

    def launch(batch, initial_job_idx):
        """A launcher that composes each job as Hydra's basic launcher does, and runs nothing."""
        for num, job in enumerate(batch, initial_job_idx):
            job_cfg = hydra.config_loader.load_sweep_config(cfg, list(job))
            with open_dict(job_cfg):
                job_cfg.hydra.job.num, job_cfg.hydra.job.id = num, f"plan_{num}"
            HydraConfig.instance().set_config(job_cfg)  # as run_job does: ${hydra:...} resolves
            # GPUs a job holds: a SLURM job's tasks (one GPU each), or the processes it spawns.
            tasks = math.prod(int(OmegaConf.select(job_cfg, f"hydra.launcher.{k}", default=1) or 1)
                              for k in ("nodes", "tasks_per_node"))
            task = OmegaConf.to_container(job_cfg, resolve=False)
            task.pop("hydra")
            task = OmegaConf.create(task)
            OmegaConf.resolve(task)
            try:  # what train.py would refuse, refused here too
                check_config(task, job_cfg.hydra.runtime.choices)
            except IdmapError as exc:
                raise IdmapError(f"job {num} ({' '.join(map(str, job))}): {exc}") from None
            jobs.append((list(map(str, job)), task, max(tasks, int(task.trainer.world_size))))
        return [JobReturn(status=JobStatus.COMPLETED, _return_value=None) for _ in batch]

    register_configs()
    with tempfile.TemporaryDirectory() as sweep_dir, \
            initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        args = [*quote_numeric_choices(list(overrides)), f"hydra.sweep.dir={sweep_dir}"]
        cfg = hydra.compose_config("train", args, run_mode=RunMode.MULTIRUN,
                                   with_log_configuration=False)
        # Callbacks(): none of the config's is made, as nothing is run (train.py's end-of-sweep one).
        sweeper = Plugins.instance().instantiate_sweeper(
            config=cfg, hydra_context=HydraContext(config_loader=hydra.config_loader,
                                                   callbacks=Callbacks()),
            task_function=lambda _: None)
        sweeper.launcher = argparse.Namespace(launch=launch)
        sweeper.validate_batch_is_legal = lambda batch: None  # launch composes every job anyway
        sweeper.sweep(arguments=OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))
    return jobs


def speed_key(cfg) -> str:
    """The settings a step's time depends on (config.Role.STEP_COST; the rest, e.g. seed, LR,
    schedule and logging, change only what it computes), as one string."""
    key = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
           for k in with_role(Role.STEP_COST) for v in [OmegaConf.select(cfg, k)]}
    return json.dumps(key, sort_keys=True, default=str)


def timing_config(cfg):
    """The job's config on synthetic images of its data set's image size and classes, for timing."""
    t = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    # A few batches of images: a step's cost does not depend on how many there are.
    t.dataset.name, t.dataset.num_train, t.dataset.num_test = "synthetic", 4 * t.trainer.batch_size, 64
    t.dataset.download = False
    t.trainer.progress, t.trainer.signal_every, t.trainer.world_size = False, 0, 1
    return t


def time_step(cfg, iters: int = 20, warmup: int = 5) -> tuple[float, str]:
    """(seconds per iteration, the device) from the trainer's own build and Loop.step on this
    machine, after `warmup` steps that are not counted."""
    import torch

    from idmap.train import trainer
    from idmap.train.runtime import configure, resolve_device

    cfg = timing_config(cfg)
    device = resolve_device(cfg.trainer.device)
    configure(cfg.trainer, cfg.seed)
    data = trainer.run_inputs(cfg, device, cfg.trainer.batch_size)
    state, model = trainer.build(cfg, data, device, 1)
    with tempfile.TemporaryDirectory() as run_dir:
        loop = trainer.Loop(cfg, Path(run_dir), state, model, data, 0, 1)
        model.train()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for it in range(warmup):
            loop.step(it)
        sync()
        start = time.perf_counter()
        for it in range(warmup, warmup + iters):
            loop.step(it)
        sync()
        seconds = (time.perf_counter() - start) / iters
        if loop.runlog:
            loop.runlog.writer.close()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return seconds, name


def plan(overrides: Sequence[str], iters: int = 20, warmup: int = 5,
         timer: Optional[Callable] = None) -> tuple[List[Job], List[str]]:
    """Every job of the sweep, timed (one timing per distinct model; `timer`: time_step), and
    the devices timed."""
    jobs, timed, devices, timer = [], {}, [], timer or time_step
    for num, (job_overrides, cfg, gpus) in enumerate(expand(overrides)):
        key = speed_key(cfg)
        if key not in timed:
            timed[key] = timer(cfg, iters, warmup)
            devices.append(timed[key][1])
        jobs.append(Job(num, job_overrides, _iterations(cfg), timed[key][0], gpus))
    return jobs, sorted(set(devices))


def _iterations(cfg) -> int:
    """The job's length as the trainer counts it (Loop.max_iters), without building anything."""
    t = cfg.trainer
    if not t.epochs:
        return int(t.max_iters)
    images = cfg.dataset.num_train if cfg.dataset.name == "synthetic" else TRAIN_IMAGES
    return round(t.epochs * images / t.batch_size)


def timeout_min(jobs: Sequence[Job]) -> int:
    return math.ceil(max((j.minutes for j in jobs), default=0.0) * MARGIN) + SLACK_MIN


def _swept(jobs: Sequence[Job]) -> List[str]:
    """Each job's overrides that differ between jobs (what the listing needs to tell them apart)."""
    keys = [{o.partition("=")[0]: o for o in j.overrides} for j in jobs]
    varying = {k for d in keys for k in d if len({d2.get(k) for d2 in keys}) > 1}
    return [" ".join(o for k, o in d.items() if k in varying) or "(one job)" for d in keys]


def report(jobs: Sequence[Job], devices: Sequence[str]) -> str:
    total_min = sum(j.minutes for j in jobs)
    out = [f"{len(jobs)} jobs, timed on {', '.join(devices)}"
           + (" (a CPU: a GPU takes far less)" if "cpu" in devices else ""), "",
           "| job | overrides | iterations | s/iter | minutes | GPU-hours |", "|---|---|---|---|---|---|"]
    for job, swept in zip(jobs, _swept(jobs)):
        out.append(f"| {job.num} | {swept} | {job.iterations} | {job.seconds_per_iter:.4f} | "
                   f"{job.minutes:.1f} | {job.gpu_hours:.2f} |")
    out += [f"| total | {len(jobs)} jobs | {sum(j.iterations for j in jobs)} | | {total_min:.1f} | "
            f"{sum(j.gpu_hours for j in jobs):.2f} |", "",
            f"hydra.launcher.timeout_min={timeout_min(jobs)} covers the slowest job "
            f"({max((j.minutes for j in jobs), default=0):.1f} min) x {MARGIN} + {SLACK_MIN} min "
            "(+launcher=slurm). Training steps only: evaluations and start-up add to every job."]
    return "\n".join(out)


def as_json(jobs: Sequence[Job], devices: Sequence[str]) -> Dict:
    return {"devices": list(devices), "timeout_min": timeout_min(jobs),
            "jobs": [{**asdict(j), "minutes": j.minutes, "gpu_hours": j.gpu_hours} for j in jobs],
            "total": {"jobs": len(jobs), "iterations": sum(j.iterations for j in jobs),
                      "minutes": sum(j.minutes for j in jobs),
                      "gpu_hours": sum(j.gpu_hours for j in jobs)}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="as for train.py -m (e.g. +experiment=table2)")
    parser.add_argument("--iters", type=cli.number(int, 1, strict=False), default=20,
                        help="timed steps per distinct model")
    parser.add_argument("--warmup", type=cli.number(int, 0, strict=False), default=5,
                        help="steps before timing, not counted")
    parser.add_argument("--json", action="store_true", help="the plan as JSON, for scripts")
    args = parser.parse_args([a for a in (sys.argv[1:] if argv is None else argv)
                              if a not in ("-m", "--multirun")])
    from hydra.errors import HydraException

    try:
        check_overrides(args.overrides)  # no option that is a path, unit files only on the search path
        jobs, devices = plan(args.overrides, args.iters, args.warmup)
    except (HydraException, IdmapError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 2
    print(json.dumps(as_json(jobs, devices), indent=2) if args.json else report(jobs, devices))
    return 0
