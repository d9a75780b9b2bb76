"""Run state: everything a run needs to continue exactly where it stopped, saved and restored by
one object, so the checkpoint's writer and reader cannot disagree on a key."""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from idmap import IdmapError
from idmap.train.checkpoint import fits, load_checkpoint, save_checkpoint
from idmap.config import Role, default, has_role, with_role

log = logging.getLogger("idmap")


class RunExists(IdmapError):
    """The run directory holds another run: refused before anything in it is touched."""


# The two refusals of a start or resume, in one wording wherever they are made: before Hydra writes
# (run.launch, run.resume) and where the checkpoint is read (TrainState.resume_from).
def refuse_checkpoint_without_resume(run_dir: Path) -> None:
    raise RunExists(f"{run_dir} already holds a checkpoint; continue it with trainer.resume={run_dir} "
                    f"(or trainer.resume=true and the same hydra.run.dir), or choose another run directory")


def refuse_other_settings(what, old: dict, new: dict) -> None:
    """RunExists when `new` changes a setting that changes what the run `what` computes."""
    changed = settings_changed(old, new)
    if changed:
        raise RunExists(f"{what} was run with other settings ({'; '.join(changed)}); only how it runs may "
                        f"change on resuming (e.g. trainer.max_iters): resume with the run's own settings "
                        f"(summary.json's 'config') or choose another run directory")


class BatchStream:
    """Shuffled passes over the data set, back to back. Every batch is full (static shapes for
    compile and CUDA graphs) and every image is seen once per epoch: a batch that crosses an epoch
    boundary takes the rest of one permutation and the start of the next, as Caffe's data layer.
    The generator is a CPU one whatever the run's device: CPU and CUDA generators differ in kind
    and state, and one data order that any device can continue lets a run move between them."""

    def __init__(self, n: int, generator: torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError("BatchStream draws the data order from a CPU generator")
        self.n, self.g = n, generator
        self.perm, self.pos = self._shuffle(), 0

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=self.g)

    def next(self, size: int) -> torch.Tensor:
        parts = []
        while size:
            take = min(size, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + take])
            self.pos, size = self.pos + take, size - take
            if self.pos == self.n:
                self.perm, self.pos = self._shuffle(), 0
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self) -> dict:
        return {"perm": self.perm.cpu(), "pos": self.pos, "generator": self.g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = state["perm"].cpu(), state["pos"]
        self.g.set_state(state["generator"].cpu())

    @staticmethod
    def restorable(state: dict) -> bool:
        """False for a checkpoint whose data order came from a GPU generator (idmap before issue
        20): its state is no CPU generator's, and no CPU generator continues that order."""
        return state["generator"].numel() == torch.Generator().get_state().numel()


def switches_changed(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every speed switch (config.Role.SWITCH) that differs between a
    checkpoint's run and this one: the resume continues equal up to rounding, not bit for bit
    (README, "Resuming"). A switch a checkpoint's run did not have yet counts as its default, the
    only way that run could run (model.ghost_bn: one_pass)."""
    def get(cfg: dict, key: str):
        section, _, name = key.partition(".")
        return cfg.get(section, {}).get(name, default(key))

    return [f"{key}: {get(old, key)} -> {get(new, key)}" for key in with_role(Role.SWITCH)
            if get(old, key) != get(new, key)]


def settings_changed(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every setting that differs between a checkpoint's run and this one,
    but those a resumed run may change (config.Role.RESUMABLE: how it runs, not what it computes)."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if a == b or has_role(section, Role.RESUMABLE):
            continue
        if not (isinstance(a, dict) and isinstance(b, dict)):
            out.append(f"{section}: {a} -> {b}")
            continue
        out += [f"{section}.{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b))
                if not has_role(f"{section}.{k}", Role.RESUMABLE) and a.get(k) != b.get(k)]
    return out


@dataclass
class TrainState:
    """The model (unwrapped), optimizer, data order, RNG, the loss/mistake sums since the last
    evaluation, and the run's history. `config` is the resolved run config, kept with the weights
    so that a checkpoint alone rebuilds its model and refuses other settings."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: BatchStream
    sums: torch.Tensor  # float64 [loss sum, mistakes] since the last evaluation, on the device
    config: dict
    num_classes: int
    iteration: int = 0
    elapsed: float = 0.0  # training seconds up to `iteration` (as saved; the loop adds its own)
    best_test_error: float | None = None
    metrics: list[dict] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)  # rundir.Summary's: who trained which iterations

    def begin_segment(self, summary: dict) -> None:
        """This process trains from here on, as `summary` (new_summary's) describes it."""
        self.segments.append({
            "iterations": [self.iteration, self.iteration], "elapsed": [self.elapsed, self.elapsed],
            # Plain str: torch.__version__ is a str subclass, which a weights-only load refuses.
            **{k: summary[k] and str(summary[k]) for k in ("device_name", "torch_version", "git_commit")},
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})

    def end_segment(self) -> None:
        """This process's segment reaches the state's iteration (at each checkpoint and the end)."""
        if self.segments:
            self.segments[-1].update(iterations=[self.segments[-1]["iterations"][0], self.iteration],
                                     elapsed=[self.segments[-1]["elapsed"][0], self.elapsed])

    def state_dict(self, sums: torch.Tensor | None = None) -> dict:
        """`sums`: all ranks' sums when several processes train (default: this process's)."""
        device = self.sums.device
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration, "stream": self.stream.state_dict(),
            "sums": (self.sums if sums is None else sums).cpu(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "elapsed": self.elapsed, "best_test_error": self.best_test_error, "metrics": self.metrics,
            "config": self.config, "num_classes": self.num_classes, "segments": self.segments,
        }

    def load_state_dict(self, state: dict, with_sums: bool = True) -> None:
        """`with_sums`: false on all ranks but 0, since the saved sums are all ranks' together."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        if with_sums:
            self.sums.copy_(state["sums"])
        # RNG states are CPU ByteTensors whatever device the checkpoint was read onto: torch's
        # setters take nothing else.
        torch.set_rng_state(state["rng_cpu"].cpu())
        if self.sums.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.sums.device)
        self.iteration, self.elapsed = state["iteration"], state["elapsed"]
        self.best_test_error = state["best_test_error"]
        self.metrics = [m for m in state["metrics"] if m["iteration"] <= self.iteration]
        self.segments = list(state.get("segments", []))  # none in an older idmap's checkpoint

    def save(self, path: Path, sums: torch.Tensor | None = None) -> None:
        self.end_segment()
        save_checkpoint(path, self.state_dict(sums))

    def resume_from(self, path: Path, resume: bool, rank: int = 0) -> None:
        """Continue the run checkpointed at `path` if there is one. Refuses (RunExists) to touch a
        run without `resume`, or one whose checkpoint was trained with other settings."""
        if not path.exists():
            if resume and rank == 0:
                log.info("trainer.resume is set but %s has no checkpoint: starting afresh", path.parent)
            return
        if not resume:
            refuse_checkpoint_without_resume(path.parent)
        # Read onto the CPU: loading copies weights, optimizer state and sums to the run's device.
        state = load_checkpoint(path)
        with fits(path):  # a checkpoint that lacks a key is one line naming the file
            refuse_other_settings(path, state["config"], self.config)
            restorable = BatchStream.restorable(state["stream"])
        if not restorable:
            raise RunExists(
                f"{path} holds a data order drawn on a GPU by an older idmap, which this one (drawing "
                f"it on the CPU, so that runs move between devices) cannot continue; start the run "
                f"afresh in another run directory"
            )
        with fits(path):
            self.load_state_dict(state, with_sums=rank == 0)
        switched = switches_changed(state["config"], self.config)
        if rank == 0:
            log.info("resuming %s at iteration %d", path.parent, self.iteration)
            if switched:
                log.warning("resuming with other speed switches (%s): the run continues equal up to "
                            "rounding, not bit for bit", "; ".join(switched))
