"""One training loop for every variant: the paper's protocol, with speed as switches.

The data set lives on the device as uint8 tensors; shuffling, cropping, flipping and normalising are
batch tensor operations; losses and errors accumulate on the device and are read only at the log
interval. The loop takes a plain config: Hydra stays in launch.py. Run state is state.py's, the run
directory's files rundir.py's, the device and signals runtime.py's.
"""

from __future__ import annotations

import datetime
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from idmap import IdmapError
from idmap.config import Role, checked, keys
from idmap.train.evaluation import evaluate
from idmap.train.inputs import Inputs
from idmap.models.resnet import build_resnet, count_parameters, model_kwargs
from idmap.rundir import CHECKPOINT, Status, Summary, git_commit
from idmap.train.runlog import RunLog, throughput
from idmap.train.runtime import (COMPILE_MODES, SGD_IMPLS, Interrupted, StopFlag, autocast, configure, device_name,
                           resolve_device)
from idmap.train.state import BatchStream, RunExists, TrainState

log = logging.getLogger("idmap")



def learning_rate(it: int, optim: Any, milestones: list[int]) -> float:
    """LR at iteration `it`: the warm-up LR for the first iterations, then lr * gamma^(steps passed)."""
    if it < optim.warmup_iters:
        return optim.warmup_lr
    return optim.lr * optim.gamma ** sum(it >= m for m in milestones)


def schedule(cfg, num_train: int) -> tuple[float, int, list[int]]:
    """(iterations per epoch, the run's length, the LR milestones) in iterations, from the epochs
    or iterations the config gives, once the training set's size is known."""
    t, o = cfg.trainer, cfg.optim
    per_epoch = num_train / t.batch_size
    iters = round(t.epochs * per_epoch) if t.epochs else t.max_iters
    milestones = [round(e * per_epoch) for e in o.milestone_epochs] if o.milestone_epochs else list(o.milestones)
    return per_epoch, iters, milestones


def check_schedule(cfg, num_train: int) -> int:
    """The run's length in iterations; IdmapError when the schedule gives none. Milestones past
    the end are allowed (short trial runs) but logged."""
    _, iters, milestones = schedule(cfg, num_train)
    if iters < 1:
        t = cfg.trainer
        raise IdmapError(f"trainer.epochs={t.epochs} gives no iteration ({num_train} images, batches of "
                         f"{t.batch_size}); raise trainer.epochs")
    if any(m >= iters for m in milestones):
        log.info("LR milestones %s lie past the run's %d iterations", milestones, iters)
    return iters


def run_inputs(cfg: DictConfig, device: torch.device, batch_size: int) -> Inputs:
    """The run's data on the device (train.inputs: the one pipeline), refused when one batch would
    be more than the training set."""
    data = Inputs.of_run(cfg.dataset, device, cfg.trainer.channels_last)
    if batch_size > len(data.train_y):
        raise IdmapError(f"trainer.batch_size {batch_size} is larger than the training set "
                         f"({len(data.train_y)} images)")
    return data


def build(cfg: DictConfig, data: Inputs, device: torch.device, world_size: int):
    """The run's fresh state and the model to call in the loop (the state's model, maybe wrapped)."""
    t, o = cfg.trainer, cfg.optim
    try:
        raw = build_resnet(**model_kwargs(cfg, data.info.num_classes)).to(device)
    except ValueError as exc:
        raise IdmapError(str(exc)) from exc
    raw = raw.to(memory_format=data.format)
    model = raw
    if world_size > 1:
        # Per-process BN statistics, as the paper's 2 GPUs x 64 (no SyncBN, no buffer broadcast).
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if t.compile != "none":
        # A fresh start for dynamo: graphs of earlier runs in this process (a joblib worker, a
        # test session) would otherwise count towards its recompile limit, past which it falls
        # back to eager without a word.
        torch.compiler.reset()
        model = torch.compile(model, **COMPILE_MODES[t.compile])
    optimizer = torch.optim.SGD(raw.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay, **SGD_IMPLS[o.impl])
    # Every process draws the same global batch and takes its slice: one seed, one data order.
    stream = BatchStream(len(data.train_y), torch.Generator().manual_seed(cfg.seed))
    sums = torch.zeros(2, device=device, dtype=torch.float64)
    state = TrainState(raw, optimizer, stream, sums, OmegaConf.to_container(cfg, resolve=True),
                       data.info.num_classes)
    return state, model


def train(cfg: DictConfig, run_dir: str | Path, rank: int = 0, world_size: int = 1,
          choices: dict | None = None, on_start=None) -> dict:
    """Train one run in `run_dir`; returns its summary. Raises Interrupted after checkpointing when
    signalled, IdmapError for bad input. `choices`: the config group choices the run records.
    `on_start`: called by rank 0 once every check has passed and the state is built or restored
    (launch.py records the run's settings then, so a refused start or resume changes no record)."""
    run_dir = Path(run_dir)
    checked(cfg, choices)  # once, at the edge that started the run; here for a caller that did not
    device = resolve_device(cfg.trainer.device)
    configure(cfg.trainer, cfg.seed)
    if device.type == "cuda":  # the summary's peak memory is this run's, not the process's
        torch.cuda.reset_peak_memory_stats(device)
    data = run_inputs(cfg, device, cfg.trainer.batch_size)
    check_schedule(cfg, len(data.train_y))
    state, model = build(cfg, data, device, world_size)
    state.resume_from(run_dir / CHECKPOINT, cfg.trainer.resume, rank)
    loop = Loop(cfg, run_dir, state, model, data, rank, world_size)
    if on_start is not None and rank == 0:
        on_start()
    summary = new_summary(cfg, state.model, data.info, device, loop.max_iters, choices or {})
    trains = state.iteration < loop.max_iters  # a resume of a finished run trains nothing: no segment
    if trains:
        state.begin_segment(summary)
    status, signum = loop.run()
    if trains:
        state.end_segment()
    metrics = state.metrics
    last = metrics[-1] if metrics and status != Status.DIVERGED else {}
    summary.update(
        status=status,
        iterations=state.iteration,
        final_test_error=last.get("test_error"),
        final_train_error=last.get("train_error"),
        best_test_error=state.best_test_error,
        wall_time_s=state.elapsed,
        segments=state.segments,
        images_per_sec=throughput(metrics),  # training time only
        peak_memory_mb=(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
        error=f"non-finite loss by iteration {state.iteration}" if status == Status.DIVERGED else None,
        ended=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if loop.runlog:
        loop.runlog.close(summary)
    if status == Status.INTERRUPTED:
        raise Interrupted(signum)
    return summary


class Loop:
    """The paper's protocol as a loop: draw a batch, set the LR, take an SGD step; every log
    interval one host sync (divergence and stop requests), every eval interval an evaluation."""

    def __init__(self, cfg: DictConfig, run_dir: Path, state: TrainState, model, data: Inputs,
                 rank: int, world_size: int):
        t = cfg.trainer
        self.cfg, self.t, self.state, self.model, self.data = cfg, t, state, model, data
        self.rank0, self.world_size, self.device = rank == 0, world_size, state.sums.device
        self.per_epoch, self.max_iters, self.milestones = schedule(cfg, len(data.train_y))
        if state.iteration > self.max_iters:  # refused before any file of the run is touched
            raise RunExists(f"{run_dir} is at iteration {state.iteration} already; trainer.max_iters "
                            f"({self.max_iters}) can be raised to extend a run, not lowered")
        self.local = slice(rank * t.batch_size // world_size, (rank + 1) * t.batch_size // world_size)
        self.autocast = autocast(t.precision, self.device)
        self.ckpt_path = run_dir / CHECKPOINT
        self.runlog = RunLog(run_dir, hparams(cfg), state.metrics, state.iteration) if self.rank0 else None
        # Signal propagation is logged on one fixed, un-augmented batch so its curves compare over time.
        self.signal_batch = ((data.prepare(data.train_x[:64]), data.train_y[:64]) if t.signal_every else None)
        self.progress = None
        if self.rank0 and t.progress:
            from tqdm import tqdm

            self.progress = tqdm(total=self.max_iters, initial=state.iteration, dynamic_ncols=True,
                                 desc=run_dir.name[-40:])

    def run(self) -> tuple[Status, int]:
        """(status, signal number) once the run ends: completed, diverged or interrupted."""
        state, t = self.state, self.t
        self.elapsed_before, self.t0 = state.elapsed, time.perf_counter()
        self.window = (self.t0, state.iteration)  # throughput counts training only, not evaluation
        status, signum = Status.COMPLETED, 0
        self.state.model.train()
        with StopFlag() as stop:
            for it in range(state.iteration, self.max_iters):
                lr = self.step(it)
                done = state.iteration = it + 1
                if t.signal_every and self.rank0 and done % t.signal_every == 0:
                    from idmap.analysis.signals import log_signals

                    log_signals(self.runlog.writer, state.model, *self.signal_batch, done)
                # A single process reacts to a signal at once; several agree at the next log
                # interval, where all of them meet in the same collective.
                urgent = self.world_size == 1 and stop.signum
                if not (urgent or done == self.max_iters or any(
                        done % every == 0 for every in (t.log_every, t.eval_every, t.checkpoint_every))):
                    continue
                diverged, signum = self.sync(done, lr, stop.signum)
                if diverged:
                    status = Status.DIVERGED
                    break
                if done % t.checkpoint_every == 0 or done == self.max_iters or signum:
                    self.save()
                if signum and done < self.max_iters:
                    status = Status.INTERRUPTED
                    break
        state.elapsed = self.elapsed()
        if self.progress:
            self.progress.close()
        return status, signum

    def step(self, it: int) -> float:
        lr = learning_rate(it, self.cfg.optim, self.milestones)
        for group in self.state.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.data.batch(self.state.stream, self.t.batch_size, self.local)
        with self.autocast:
            out = self.model(x)
            loss = F.cross_entropy(out.float(), y)
        self.state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.state.optimizer.step()
        self.state.sums += torch.stack([loss.detach().double() * len(y), (out.argmax(1) != y).sum().double()])
        return lr

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def sync(self, done: int, lr: float, stop_signum: int) -> tuple[bool, int]:
        """The log-interval block: one host sync, on which all ranks agree on divergence and stops;
        an evaluation when due. Returns (diverged, the signal to stop for or 0)."""
        flags = torch.cat([self.state.sums, torch.tensor([float(stop_signum)], device=self.device,
                                                         dtype=torch.float64)])
        if self.world_size > 1:
            dist.all_reduce(flags)
        loss_sum, wrong_sum, signalled = flags.tolist()
        signum = stop_signum or (signal.SIGTERM if signalled else 0)
        if not math.isfinite(loss_sum):
            return True, signum
        if self.progress:
            metrics = self.state.metrics
            seen = (done - (metrics[-1]["iteration"] if metrics else 0)) * self.t.batch_size
            start, start_it = self.window
            rate = (done - start_it) * self.t.batch_size / (time.perf_counter() - start)
            self.progress.update(done - self.progress.n)
            self.progress.set_postfix(loss=f"{loss_sum / seen:.3f}", err=f"{100 * wrong_sum / seen:.1f}%",
                                      lr=f"{lr:g}", img_s=f"{rate:.0f}")
        if done % self.t.eval_every == 0 or done == self.max_iters:
            return self.close_window(done, lr), signum
        return False, signum

    def close_window(self, done: int, lr: float) -> bool:
        """Closes an evaluation window: train loss/error over it, test loss/error now; rank 0 logs.
        Returns whether the test loss diverged (all ranks agree)."""
        state, sums = self.state, self.state.sums
        if self.world_size > 1:
            dist.all_reduce(sums)
        train_loss, wrong = sums.tolist()  # a host sync: the window's steps are done
        now = time.perf_counter()
        last_eval = state.metrics[-1]["iteration"] if state.metrics else 0
        count = (done - last_eval) * self.t.batch_size  # all ranks' images, once reduced
        test_loss, test_error = math.nan, math.nan
        if self.rank0:
            result = evaluate(state.model, self.data.test_x, self.data.test_y, self.t.eval_batch_size,
                              self.data.prepare, self.autocast)
            test_loss, test_error = result.loss, result.error
        start, start_it = self.window
        entry = {
            "iteration": done, "epoch": round(done / self.per_epoch, 3), "lr": lr,
            "train_loss": train_loss / count, "train_error": 100.0 * wrong / count,
            "test_loss": test_loss, "test_error": test_error,
            "images_per_sec": (done - start_it) * self.t.batch_size / (now - start),
            "window_from": start_it,  # the rate's first iteration: a resume starts its window late
            "elapsed": self.elapsed_before + now - self.t0,
            # When the window closed, on the wall clock: windows of runs that ran side by side
            # can then be set against each other (the GPU check's packing rows).
            "time": time.time(),
        }
        sums.zero_()
        diverged = False
        if self.rank0:
            diverged = not math.isfinite(test_loss)
            best = state.best_test_error
            state.best_test_error = test_error if best is None else min(best, test_error)
            state.metrics.append(entry)
            self.runlog.evaluation(state.metrics)
            log.info("it %d  train %.2f%%  test %.2f%%  lr %g  %.0f img/s", done,
                     entry["train_error"], test_error, lr, entry["images_per_sec"])
        if self.world_size > 1:
            flag = torch.tensor([diverged], device=self.device, dtype=torch.float64)
            dist.all_reduce(flag)
            diverged = bool(flag.item())
        self.window = (time.perf_counter(), done)
        return diverged

    def save(self) -> None:
        """Writes the checkpoint; its time is no training time, so the throughput window skips it."""
        began = time.perf_counter()  # after sync()'s host sync: the window's steps are done
        sums = self.state.sums.clone()
        if self.world_size > 1:  # a checkpoint between evaluations holds every rank's partial sums
            dist.all_reduce(sums)
        if self.rank0:
            self.state.elapsed = self.elapsed()
            self.state.save(self.ckpt_path, sums)
        if self.world_size > 1:
            dist.barrier()
        start, start_it = self.window
        self.window = (start + time.perf_counter() - began, start_it)


def hparams(cfg: DictConfig) -> dict:
    """The keys declared HPARAM (config.Role), flat, as TensorBoard's HParams view wants them:
    single values only (a list or an unset key is no column)."""
    flat = {}
    for key in keys().values():
        value = OmegaConf.select(cfg, key.name)
        if Role.HPARAM in key.roles and isinstance(value, (int, float, str, bool)):
            flat[key.hparam] = value
    return flat


def new_summary(cfg: DictConfig, model, ds, device: torch.device, max_iters: int, choices: dict) -> Summary:
    """summary.json as a run starts; `model` records what was built, which may differ from the
    group choices (e.g. `model.block=original` on the command line leaves the block choice as is)."""
    return {
        "status": Status.RUNNING,
        "final_test_error": None,
        "best_test_error": None,
        "final_train_error": None,
        "iterations": 0,
        "max_iters": max_iters,
        "params": count_parameters(model),
        "wall_time_s": 0.0,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_name": device_name(device),  # the CPU's model and threads too (of this segment)
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "seed": cfg.seed,
        "dataset": {"name": ds.name, "label": ds.label},
        "choices": choices,
        "model": {k: model.arch[k] for k in ("depth", "unit", "block", "downsample")},
        "shortcut": OmegaConf.to_container(cfg.shortcut, resolve=True),
        "tags": OmegaConf.to_container(cfg.tags, resolve=True),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "error": None,
    }
