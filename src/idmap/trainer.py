"""One training loop for every variant: the paper's protocol, with speed as switches.

The data set lives on the device as uint8 tensors; shuffling, cropping, flipping and normalising are
batch tensor operations; losses and errors accumulate on the device and are read only when logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from idmap import IdmapError
from idmap.checkpoint import (CHECKPOINT, atomic_write, load_checkpoint, model_kwargs, save_checkpoint,
                              write_json)
from idmap.models import build_resnet, count_parameters

log = logging.getLogger("idmap")

SUMMARY, METRICS = "summary.json", "metrics.jsonl"
PAD = 4  # the paper's 4-pixel zero padding before a random 32x32 crop


# --------------------------------------------------------------------------------------------------
# Schedule and sampling
# --------------------------------------------------------------------------------------------------
def learning_rate(it: int, optim: Any, milestones: list[int]) -> float:
    """LR at iteration `it`: the warm-up LR for the first iterations, then lr * gamma^(steps passed)."""
    if it < optim.warmup_iters:
        return optim.warmup_lr
    return optim.lr * optim.gamma ** sum(it >= m for m in milestones)


class BatchStream:
    """Shuffled passes over the data set, back to back. Every batch is full (static shapes for
    compile and CUDA graphs) and every image is seen once per epoch: a batch that crosses an epoch
    boundary takes the rest of one permutation and the start of the next, as Caffe's data layer."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g = n, generator
        self.perm, self.pos = self._shuffle(), 0

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=self.g, device=self.g.device)

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
        self.perm, self.pos = state["perm"].to(self.g.device), state["pos"]
        self.g.set_state(state["generator"])


# --------------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------------
def resolve_device(name: str, rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise IdmapError(f"trainer.device={name} but CUDA is not available here; use trainer.device=cpu")
    if name.startswith("cuda") and dist.is_initialized():
        return torch.device("cuda", rank)  # one process per GPU
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def validate(cfg: DictConfig) -> None:
    t, o = cfg.trainer, cfg.optim
    checks = [
        (o.lr > 0, f"optim.lr must be positive, got {o.lr}"),
        (t.batch_size > 0, f"trainer.batch_size must be positive, got {t.batch_size}"),
        (t.max_iters > 0 or (t.epochs or 0) > 0, "trainer.max_iters (or trainer.epochs) must be positive"),
        (t.eval_every > 0, f"trainer.eval_every must be positive, got {t.eval_every}"),
        (t.eval_batch_size > 0, f"trainer.eval_batch_size must be positive, got {t.eval_batch_size}"),
        (o.warmup_iters >= 0, f"optim.warmup_iters must be >= 0, got {o.warmup_iters}"),
        (t.checkpoint_every > 0, f"trainer.checkpoint_every must be positive, got {t.checkpoint_every}"),
        (t.log_every > 0, f"trainer.log_every must be positive, got {t.log_every}"),
        (t.world_size >= 1, f"trainer.world_size must be >= 1, got {t.world_size}"),
        (t.batch_size % t.world_size == 0, f"trainer.batch_size {t.batch_size} must divide over {t.world_size} processes"),
        (t.precision in ("fp32", "tf32", "bf16"), f"trainer.precision must be fp32, tf32 or bf16, got {t.precision}"),
        (t.compile in ("none", "default", "reduce-overhead", "max-autotune"),
         f"trainer.compile must be none, default, reduce-overhead or max-autotune, got {t.compile}"),
        (o.impl in ("foreach", "fused", "loop"), f"optim.impl must be foreach, fused or loop, got {o.impl}"),
        (not (cfg.gpu_pool.enabled and t.world_size > 1),
         "gpu_pool gives each job one GPU; it cannot run trainer.world_size > 1 processes"),
    ]
    for ok, message in checks:
        if not ok:
            raise IdmapError(message)


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# SIGUSR2 is how submitit/SLURM announce a timeout or preemption shortly before they kill the job.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR2") if hasattr(signal, name))


class StopFlag:
    """SIGTERM/SIGINT/SIGUSR2 (preemption, Ctrl-C) only set a flag: the loop checkpoints at the next
    iteration boundary and exits, so no step is half-applied."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: the user insists
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: checkpointing at the next iteration", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
class RunExists(IdmapError):
    """The run directory holds another run: refused before anything in it is touched."""


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def train(cfg: DictConfig, run_dir: str | Path, rank: int = 0, world_size: int = 1,
          choices: dict | None = None) -> dict:
    """Train one run in `run_dir`; returns its summary. Raises Interrupted after checkpointing when
    signalled, IdmapError for bad input. `choices`: the config group choices (Hydra's, by default)."""
    from idmap import data as datamod

    run_dir = Path(run_dir)
    validate(cfg)
    t, o = cfg.trainer, cfg.optim
    main = rank == 0
    device = resolve_device(t.device, rank)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # fp32 means fp32: cuDNN would otherwise use TF32 for convolutions by default.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = t.precision == "tf32"
    torch.backends.cudnn.benchmark = not t.deterministic
    torch.manual_seed(cfg.seed)

    ds = datamod.load_dataset(cfg.dataset)
    n_train = len(ds.train_y)
    if t.batch_size > n_train:
        raise IdmapError(f"trainer.batch_size {t.batch_size} is larger than the training set ({n_train} images)")
    per_epoch = n_train / t.batch_size
    max_iters = round(t.epochs * per_epoch) if t.epochs else t.max_iters
    milestones = [round(e * per_epoch) for e in o.milestone_epochs] if o.milestone_epochs else list(o.milestones)
    mean, std = (v.to(device) for v in datamod.normalization(ds.train_x, cfg.dataset.normalization))
    train_x, train_y = ds.train_x.to(device), ds.train_y.to(device)
    test_x, test_y = ds.test_x.to(device), ds.test_y.to(device)

    try:
        raw = build_resnet(**model_kwargs(cfg, ds.num_classes)).to(device)
    except ValueError as exc:
        raise IdmapError(str(exc)) from exc
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    raw = raw.to(memory_format=memory_format)
    model = raw
    if world_size > 1:
        # Per-process BN statistics, as the paper's 2 GPUs x 64 (no SyncBN, no buffer broadcast).
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if t.compile != "none":
        model = torch.compile(model, mode=None if t.compile == "default" else t.compile)
    impl = {"foreach": dict(foreach=True), "fused": dict(fused=True), "loop": dict(foreach=False)}[o.impl]
    optimizer = torch.optim.SGD(raw.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay, **impl)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16"
                else contextlib.nullcontext())

    # Every process draws the same global batch and takes its slice: one seed, one data order.
    stream = BatchStream(n_train, torch.Generator(device=device).manual_seed(cfg.seed))
    local = slice(rank * t.batch_size // world_size, (rank + 1) * t.batch_size // world_size)
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # loss and mistakes since the last eval
    metrics: list[dict] = []
    start_it, elapsed_before, best = 0, 0.0, None

    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists():
        if not t.resume:
            raise RunExists(
                f"{run_dir} already holds a checkpoint; continue it with trainer.resume=true "
                f"(and the same hydra.run.dir), or choose another run directory"
            )
        state = load_checkpoint(ckpt_path, map_location=device)
        changed = settings_changed(state["config"], OmegaConf.to_container(cfg, resolve=True))
        if changed:
            raise RunExists(
                f"{ckpt_path} was trained with other settings ({'; '.join(changed)}); resume with the "
                f"run's own settings (summary.json's 'config') or choose another run directory"
            )
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["stream"])
        if main:  # the saved sums are all ranks' together: counted once, on rank 0
            sums.copy_(state["sums"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start_it, elapsed_before, best = state["iteration"], state["elapsed"], state["best_test_error"]
        metrics = [m for m in state["metrics"] if m["iteration"] <= start_it]
        if main:
            log.info("resuming %s at iteration %d", run_dir, start_it)
    elif t.resume and main:
        log.info("trainer.resume=true but %s has no checkpoint: starting afresh", run_dir)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after its last checkpoint.
        writer = SummaryWriter(str(run_dir), purge_step=start_it if start_it else None)
        if not start_it:
            _write_hparams(writer, cfg)
        _write_metrics(run_dir, metrics)

    summary = _summary_base(cfg, raw, ds, device, max_iters, _choices() if choices is None else choices)

    def batch(idx_global: torch.Tensor, draws: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        idx, dy, dx, flip = idx_global[local], *(d[local] for d in draws)
        x = datamod.normalize(train_x[idx], mean, std)
        if cfg.dataset.augment:
            x = datamod.crop_flip(x, dy, dx, flip, PAD)
        return x.contiguous(memory_format=memory_format), train_y[idx]

    def evaluate() -> tuple[float, float]:
        raw.eval()
        totals = torch.zeros(2, device=device, dtype=torch.float64)
        with torch.no_grad(), autocast:
            for i in range(0, len(test_y), t.eval_batch_size):
                x = datamod.normalize(test_x[i : i + t.eval_batch_size], mean, std)
                out = raw(x.contiguous(memory_format=memory_format)).float()
                y = test_y[i : i + t.eval_batch_size]
                totals += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                                       (out.argmax(1) != y).sum().double()])
        raw.train()
        loss, wrong = totals.tolist()
        return loss / len(test_y), 100.0 * wrong / len(test_y)

    def checkpoint(it: int, elapsed: float) -> None:
        saved_sums = sums.clone()
        if world_size > 1:  # a checkpoint between evaluations holds every rank's partial sums
            dist.all_reduce(saved_sums)
        if main:
            save_checkpoint(ckpt_path, {
                "model": raw.state_dict(), "optimizer": optimizer.state_dict(), "iteration": it,
                "stream": stream.state_dict(), "sums": saved_sums.cpu(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "elapsed": elapsed, "best_test_error": best, "metrics": metrics,
                "config": OmegaConf.to_container(cfg, resolve=True), "num_classes": ds.num_classes,
            })
        if world_size > 1:
            dist.barrier()

    # Signal propagation is logged on one fixed, un-augmented batch so its curves compare over time.
    signal_batch = (datamod.normalize(train_x[:64], mean, std).contiguous(memory_format=memory_format),
                    train_y[:64]) if t.signal_every else None

    progress = None
    if main and t.progress:
        from tqdm import tqdm

        progress = tqdm(total=max_iters, initial=start_it, dynamic_ncols=True, desc=run_dir.name[-40:])

    raw.train()
    stop, signum = StopFlag(), 0
    status, done = "completed", start_it
    t0 = time.perf_counter()
    window_start, window_it = t0, start_it
    with stop:
        for it in range(start_it, max_iters):
            lr = learning_rate(it, o, milestones)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = batch(stream.next(t.batch_size), datamod.draw_crop_flip(t.batch_size, stream.g, PAD))
            with autocast:
                out = model(x)
                loss = F.cross_entropy(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach().double() * len(y), (out.argmax(1) != y).sum().double()])
            done = it + 1
            if t.signal_every and main and done % t.signal_every == 0:
                from idmap.signal import log_signals

                log_signals(writer, raw, *signal_batch, done)
            # A single process reacts to a signal at once; several agree at the next log interval,
            # where all of them meet in the same collective.
            urgent = world_size == 1 and stop.signum
            if (done % t.log_every and done % t.eval_every and done % t.checkpoint_every
                    and done != max_iters and not urgent):
                continue
            # One host sync per log interval: divergence and stop requests are agreed by all ranks.
            flags = torch.cat([sums, torch.tensor([float(stop.signum)], device=device, dtype=torch.float64)])
            if world_size > 1:
                dist.all_reduce(flags)
            loss_sum, wrong_sum, signalled = flags.tolist()
            signum = stop.signum or (signal.SIGTERM if signalled else 0)
            if not math.isfinite(loss_sum):
                status = "diverged"
                break
            if progress:
                seen = (done - (metrics[-1]["iteration"] if metrics else 0)) * t.batch_size
                rate = (done - window_it) * t.batch_size / (time.perf_counter() - window_start)
                progress.update(done - progress.n)
                progress.set_postfix(loss=f"{loss_sum / seen:.3f}", err=f"{100 * wrong_sum / seen:.1f}%",
                                     lr=f"{lr:g}", img_s=f"{rate:.0f}")
            if done % t.eval_every == 0 or done == max_iters:
                if world_size > 1:
                    dist.all_reduce(sums)
                train_loss, wrong = sums.tolist()  # a host sync: the window's steps are done
                now = time.perf_counter()  # throughput counts training only, not the evaluation
                last_eval = metrics[-1]["iteration"] if metrics else 0
                count = (done - last_eval) * t.batch_size  # all ranks' images, once reduced
                test_loss, test_error = evaluate() if main else (math.nan, math.nan)
                entry = {
                    "iteration": done, "epoch": round(done / per_epoch, 3), "lr": lr,
                    "train_loss": train_loss / count, "train_error": 100.0 * wrong / count,
                    "test_loss": test_loss, "test_error": test_error,
                    "images_per_sec": (done - window_it) * t.batch_size / (now - window_start),
                    "elapsed": elapsed_before + now - t0,
                }
                sums.zero_()
                if main:
                    if not math.isfinite(test_loss):
                        status = "diverged"
                    best = test_error if best is None else min(best, test_error)
                    metrics.append(entry)
                    _write_metrics(run_dir, metrics)
                    _log_scalars(writer, entry)
                    log.info("it %d  train %.2f%%  test %.2f%%  lr %g  %.0f img/s", done,
                             entry["train_error"], test_error, lr, entry["images_per_sec"])
                if world_size > 1:
                    flag = torch.tensor([status == "diverged"], device=device, dtype=torch.float64)
                    dist.all_reduce(flag)
                    status = "diverged" if flag.item() else status
                if status == "diverged":
                    break
                window_start, window_it = time.perf_counter(), done
            if done % t.checkpoint_every == 0 or done == max_iters or signum:
                checkpoint(done, elapsed_before + time.perf_counter() - t0)
            if signum and done < max_iters:
                status = "interrupted"
                break
    if progress:
        progress.close()
    summary.update(
        status=status,
        iterations=done,
        final_test_error=metrics[-1]["test_error"] if metrics and status != "diverged" else None,
        final_train_error=metrics[-1]["train_error"] if metrics and status != "diverged" else None,
        best_test_error=best,
        wall_time_s=elapsed_before + time.perf_counter() - t0,
        images_per_sec=_mean([m["images_per_sec"] for m in metrics]),
        peak_memory_mb=(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
    )
    if status == "diverged":
        summary["error"] = f"non-finite loss by iteration {done}"
    if main:
        if writer is not None:
            final = summary["final_test_error"]
            writer.add_scalar("hparam/final_test_error", math.nan if final is None else final, done)
            writer.close()
        write_json(run_dir / SUMMARY, summary)
    if status == "interrupted":
        raise Interrupted(signum)
    return summary


# Settings a resumed run may change: how it runs, not what it computes.
RESUMABLE = {"trainer": {"max_iters", "epochs", "eval_every", "eval_batch_size", "checkpoint_every",
                         "log_every", "device", "resume", "progress", "signal_every", "world_size",
                         "precision", "channels_last", "compile", "deterministic"},
             "dataset": {"root", "download", "label"}, "gpu_pool": None, "tags": None}


def settings_changed(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every setting that differs between a checkpoint's run and this one."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        free = RESUMABLE.get(section, set())
        if free is None or a == b:
            continue
        if not (isinstance(a, dict) and isinstance(b, dict)):
            out.append(f"{section}: {a} -> {b}")
            continue
        out += [f"{section}.{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b))
                if k not in free and a.get(k) != b.get(k)]
    return out


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _write_metrics(run_dir: Path, metrics: list[dict]) -> None:
    # Rewritten whole (it is small) so that it is never half-written and, after a resume, holds
    # exactly the evaluations up to the checkpoint followed by the new ones.
    atomic_write(run_dir / METRICS, lambda f: f.writelines(json.dumps(m) + "\n" for m in metrics), mode="w")


def _log_scalars(writer, e: dict) -> None:
    it = e["iteration"]
    for tag, key in [("error/train", "train_error"), ("error/test", "test_error"), ("loss/train", "train_loss"),
                     ("loss/test", "test_loss"), ("lr", "lr"), ("throughput/images_per_sec", "images_per_sec")]:
        writer.add_scalar(tag, e[key], it)
    writer.flush()


def _hparams(cfg: DictConfig) -> dict:
    """The choices a sweep varies, flat, as TensorBoard's HParams view wants them."""
    flat = {}
    for section in ("model", "shortcut", "optim"):
        for key, value in OmegaConf.to_container(cfg[section], resolve=True).items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    flat.update({"dataset": cfg.dataset.name, "seed": cfg.seed, "batch_size": cfg.trainer.batch_size})
    return flat


def _write_hparams(writer, cfg: DictConfig) -> None:
    from torch.utils.tensorboard.summary import hparams

    for s in hparams(_hparams(cfg), {"error/test": 0.0, "error/train": 0.0, "hparam/final_test_error": 0.0}):
        writer.file_writer.add_summary(s)


def _summary_base(cfg: DictConfig, model, ds, device: torch.device, max_iters: int, choices: dict) -> dict:
    return {
        "status": "running",
        "final_test_error": None,
        "best_test_error": None,
        "final_train_error": None,
        "iterations": 0,
        "max_iters": max_iters,
        "params": count_parameters(model),
        "wall_time_s": 0.0,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
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


def _choices() -> dict:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra/")}


# --------------------------------------------------------------------------------------------------
# Entry points: one process, or several spawned for data parallelism
# --------------------------------------------------------------------------------------------------
def _worker(rank: int, world_size: int, cfg_dict: dict, run_dir: str, port: int, choices: dict) -> None:
    cfg = OmegaConf.create(cfg_dict)
    use_cuda = resolve_device(cfg.trainer.device).type == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if use_cuda:
        torch.cuda.set_device(rank)
    else:  # CPU processes share the cores rather than each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    try:
        train(cfg, run_dir, rank, world_size, choices)
    except Interrupted:
        pass
    finally:
        dist.destroy_process_group()


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train, spawning `trainer.world_size` processes if asked; returns the summary."""
    world_size = cfg.trainer.world_size
    if world_size == 1:
        return train(cfg, run_dir)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Fetch (or decode and cache) the data once here, so the ranks do not race to download it.
    from idmap.data import load_dataset

    load_dataset(cfg.dataset)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    # The workers have no Hydra context: they get the group choices from here.
    mp.spawn(_worker, args=(world_size, cfg_dict, str(run_dir), port, _choices()), nprocs=world_size, join=True)
    with open(Path(run_dir) / SUMMARY) as f:
        summary = json.load(f)
    if summary["status"] == "interrupted":
        raise Interrupted(signal.SIGTERM)
    return summary


def main(cfg: DictConfig) -> dict | None:
    """The Hydra task: one run in Hydra's output directory. Bad input ends a single run with one
    line and exit code 2; in a multirun a failed job is recorded in its summary.json and the sweep
    goes on. HYDRA_FULL_ERROR=1 shows tracebacks."""
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
        with pin_job_to_gpu(cfg.gpu_pool) as device:
            if device is not None:
                cfg.trainer.device = device
            summary = run(cfg, run_dir)
        log.info("%s: final test error %s%%", summary["status"], summary["final_test_error"])
        return summary
    except Interrupted as exc:
        log.warning("%s; continue with trainer.resume=true hydra.run.dir=%s", exc, run_dir)
        handler = signal.getsignal(exc.signum)
        if callable(handler) and handler is not signal.default_int_handler:
            # Checkpoint saved: now let the handler we deferred (submitit's requeue) have the signal.
            signal.raise_signal(exc.signum)
        sys.exit(128 + exc.signum)
    except Exception as exc:
        if not isinstance(exc, RunExists):  # a refused start leaves the run it found as it was
            _record_failure(run_dir, cfg, exc)
        if full_error or (not multirun and not isinstance(exc, IdmapError)):
            raise
        if multirun:
            log.error("job failed: %s (details in %s)", exc, run_dir / SUMMARY)
            return None
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _record_failure(run_dir: Path, cfg: DictConfig, exc: Exception) -> None:
    path = run_dir / SUMMARY
    try:
        summary = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        summary = {}
    summary.update(status="failed", error=f"{type(exc).__name__}: {exc}", choices=_choices(),
                   config=OmegaConf.to_container(cfg, resolve=False), seed=cfg.seed,
                   traceback=traceback.format_exc())
    with contextlib.suppress(Exception):
        write_json(path, summary)
