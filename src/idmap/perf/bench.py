"""Training throughput: a classic PyTorch loop against this project's trainer at each speed setting.

    python scripts/bench.py [--depths 20 110 164 1001] [--iters 100] [--warmup 20] [--batch-size 128]
                            [--device auto|cuda|cpu] [--settings NAME ...] [--workers 8]
                            [--num-train 50000] [--widths 16 32 64] [--block full_preact] [--out FILE.md]

Prints a markdown table: images/s, ms per iteration, peak memory, the speed-up over the classic
loop, and the minutes the paper's 64k iterations would take at that speed. docs/benchmarks.md says
what is measured and what each setting changes.

The classic loop is the textbook one: torchvision transforms on PIL images in DataLoader workers,
eager, at PyTorch's default numerics (cuDNN convolutions in TF32 where the GPU has it), `.item()`
every step: the baseline of every speed-up. On a GPU a strict-fp32 classic row stands beside it.
The project's rows call idmap.train.trainer.train itself, so they time exactly the code a training run
executes; the ghost-BN rows set the one-pass ghost batch norm against the chunked one it replaced.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from idmap.train import data as datamod
from idmap.config import compose_config
from idmap.models.resnet import build_resnet, model_kwargs
from idmap.paths import CONF
from idmap.rundir import Status, read_metrics
from idmap.train.runtime import Interrupted, device_name, set_tf32
from idmap.train.inputs import PAD
from idmap.train.runlog import throughput
from idmap.train.trainer import learning_rate, train

PAPER_ITERS = 64_000


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[str, ...]
    cuda_only: str = ""  # why the setting is skipped on a CPU unless named in --settings
    min_depth: int = 0  # skipped below this depth unless named in --settings


_CL = ("trainer.channels_last=true",)
_BF16_CL = ("trainer.precision=bf16", *_CL)
_FUSED = (*_BF16_CL, "optim.impl=fused")
_GHOST = "model.bn_batch={half_batch}"
_CHUNKED = "model.ghost_bn=chunked"  # the reference: one BN call per chunk
_NO_TF32 = "TF32 is a tensor-core mode of CUDA GPUs; on a CPU it is fp32"

# A ladder: each row adds one switch to the row above it, so its speed-up over that row is what
# the switch buys. The checkpointing rows trade compute for memory and only pay on the deepest nets.
SETTINGS = (
    Setting("fp32", ("trainer.precision=fp32",)),
    Setting("tf32", ("trainer.precision=tf32",), _NO_TF32),
    Setting("tf32+channels_last", ("trainer.precision=tf32", *_CL), _NO_TF32),
    Setting("bf16+channels_last", _BF16_CL),
    Setting("bf16+channels_last+fused_sgd", _FUSED),
    Setting("bf16+channels_last+fused_sgd+compile", (*_FUSED, "trainer.compile=default")),
    Setting("bf16+channels_last+fused_sgd+compile-reduce-overhead", (*_FUSED, "trainer.compile=reduce-overhead"),
            "CUDA graphs (torch.compile's reduce-overhead mode) exist only on CUDA"),
    Setting("bf16+channels_last+fused_sgd+checkpointing", (*_FUSED, "model.checkpointing=true"), min_depth=1000),
    Setting("bf16+channels_last+fused_sgd+compile+checkpointing",
            (*_FUSED, "trainer.compile=default", "model.checkpointing=true"), min_depth=1000),
    # The paper's BN over 64 of the 128 images (half the batch here): one pass against one BN call
    # per chunk, eager and compiled.
    Setting("bf16+channels_last+fused_sgd+ghost_bn", (*_FUSED, _GHOST)),
    Setting("bf16+channels_last+fused_sgd+ghost_bn_chunked", (*_FUSED, _GHOST, _CHUNKED)),
    Setting("bf16+channels_last+fused_sgd+compile+ghost_bn", (*_FUSED, _GHOST, "trainer.compile=default")),
    Setting("bf16+channels_last+fused_sgd+compile+ghost_bn_chunked",
            (*_FUSED, _GHOST, "trainer.compile=default", _CHUNKED)),
)
BY_NAME = {s.name: s for s in SETTINGS}
CLASSIC_STRICT = "classic-strict-fp32"


def base_overrides(args, depth: int) -> list[str]:
    """The model and data both loops share; evaluation is one batch since it is not what is timed."""
    named = (CONF / "depth" / f"{depth}.yaml").exists()  # the paper's unit type for its depths
    out = [f"depth={depth}" if named else f"model.depth={depth}", f"block={args.block}",
           "dataset=synthetic", f"dataset.num_train={args.num_train}", f"dataset.num_test={args.batch_size}",
           f"trainer.batch_size={args.batch_size}", f"trainer.eval_batch_size={args.batch_size}",
           f"trainer.device={args.device}"]
    if args.widths:
        out.append(f"model.widths=[{','.join(map(str, args.widths))}]")
    return out


def free(device: torch.device) -> None:
    """Drop the last run's tensors, compiled graphs and CUDA graph pools, and restart the peak
    memory counter that the trainer's summary reads. torch.compiler.reset also keeps dynamo's
    recompile limit from silently sending later models back to eager."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------------
# (1) The classic loop
# --------------------------------------------------------------------------------------------------
class PILImages(torch.utils.data.Dataset):
    """The uint8 images as torchvision's CIFAR10 serves them: one PIL image at a time, transformed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        # An N x H x W x C view of the N x C x H x W array, as CIFAR10 keeps its data.
        self.x, self.y, self.transform = x.permute(0, 2, 3, 1).numpy(), y.tolist(), transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), self.y[i]


def classic(cfg, args, device: torch.device, strict_fp32: bool = False) -> tuple[float, float | None]:
    """images/s and peak MiB of the textbook loop, on the same data, model and SGD as the trainer.
    `strict_fp32`: TF32 off, as the trainer's trainer.precision=fp32."""
    from torchvision import transforms as T

    # Eager as PyTorch ships it (TF32 convolutions, what users run), plus the one line classic CIFAR
    # scripts do add (cudnn.benchmark, which the trainer sets too): the speed-up then measures the
    # loop and the switches, not autotuning. Earlier rows' flags are undone here.
    set_tf32("fp32" if strict_fp32 else "default")
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    ds = datamod.load_dataset(cfg.dataset)
    mean, std = (v.flatten().tolist() for v in datamod.normalization(ds.train_x, cfg.dataset.normalization))
    size = ds.train_x.shape[-1]
    transform = T.Compose([T.RandomCrop(size, padding=PAD), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(
        PILImages(ds.train_x, ds.train_y, transform), batch_size=args.batch_size, shuffle=True,
        num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=args.workers > 0)
    model = build_resnet(**model_kwargs(cfg, ds.num_classes)).to(device).train()
    o = cfg.optim
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate(0, o, []), momentum=o.momentum,
                                nesterov=o.nesterov, weight_decay=o.weight_decay)

    def epochs():
        while True:
            yield from loader

    batches = epochs()

    def step() -> float:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()  # the classic habit: a host sync every step

    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(device)
    return args.iters * args.batch_size / (time.perf_counter() - t0), peak_mib(device)


# --------------------------------------------------------------------------------------------------
# (2) This project's trainer
# --------------------------------------------------------------------------------------------------
def project(cfg, args, device: torch.device) -> tuple[float, float | None]:
    """images/s and peak MiB of idmap.train.trainer.train itself. The first evaluation, after the warm-up,
    starts the timed window (compile and autotuning fall before it); every later metrics entry is
    part of it, combined as total images over total seconds."""
    with tempfile.TemporaryDirectory(prefix="idmap-bench-") as run_dir:
        summary = train(cfg, run_dir)
        metrics = read_metrics(run_dir)
        if summary["status"] != Status.COMPLETED or len(metrics) < 2:
            raise RuntimeError(f"run {summary['status']} after {summary['iterations']} iterations")
    return throughput(metrics, after_first=True), summary["peak_memory_mb"]  # as summary.json has it


def trainer_overrides(args, depth: int, setting: Setting) -> list[str]:
    # Evaluate (and sync) once right after the warm-up; later evaluations close the timed windows.
    # The LR warm-up stays the paper's: the timed iterations are its first ones (LR does not change speed).
    overrides = [o.format(half_batch=max(1, args.batch_size // 2)) for o in setting.overrides]
    return [*base_overrides(args, depth), *overrides, f"trainer.max_iters={args.warmup + args.iters}",
            f"trainer.eval_every={args.warmup}", f"trainer.log_every={args.warmup}",
            "trainer.checkpoint_every=1000000000", "trainer.progress=false"]


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------
COLUMNS = ("depth", "loop / setting", "images/s", "ms/iter", "peak MiB", "speed-up", "64k iters (min)")


def row_record(depth: int, name: str, result, batch: int, baseline: float | None) -> dict:
    """One row's numbers, unrounded (`--rows`); `result` is (images/s, peak MiB) or an error message."""
    if isinstance(result, str):
        return {"depth": depth, "setting": name, "error": result}
    ips, peak = result
    ms = 1000 * batch / ips
    return {"depth": depth, "setting": name, "images_per_sec": ips, "ms_per_iter": ms, "peak_mib": peak,
            "speedup": ips / baseline if baseline else None, "minutes_64k": PAPER_ITERS * ms / 60_000}


def row(rec: dict) -> str:
    """A row_record as a line of the markdown table."""
    if "error" in rec:
        cells = [f"failed: {rec['error']}", "", "", "", ""]
    else:
        cells = [f"{rec['images_per_sec']:,.0f}", f"{rec['ms_per_iter']:.1f}",
                 "" if rec["peak_mib"] is None else f"{rec['peak_mib']:,.0f}",
                 "" if rec["speedup"] is None else f"{rec['speedup']:.2f}x", f"{rec['minutes_64k']:.1f}"]
    return "| " + " | ".join([str(rec["depth"]), rec["setting"], *cells]) + " |"


def short_error(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:100]}".replace("|", "/")


def header(args, device: torch.device, argv: list[str]) -> list[str]:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    widths = "/".join(map(str, args.widths)) if args.widths else "the paper's"
    return [
        f"Device: {device_name(device)}; torch {torch.__version__}; {when}; "
        f"command: `python scripts/bench.py {shlex.join(argv)}`",
        "",
        f"Data: {args.num_train:,} generated 32x32 uint8 images (dataset=synthetic), not CIFAR-10; both loops "
        "read the same set. Throughput does not depend on pixel content. Batch "
        f"{args.batch_size}, {args.block} units, {widths} widths; {args.warmup} warm-up then {args.iters} "
        f"timed iterations per row. Classic loop (the speed-ups' baseline): DataLoader with {args.workers} "
        "workers, torchvision transforms on PIL images, eager at PyTorch's defaults (TF32 convolutions on "
        "GPUs that have it), `.item()` every step; classic-strict-fp32 is the same loop with TF32 off. "
        "Ghost-BN rows: BN over half the batch, one pass (ghost_bn) or one BN call per chunk (_chunked).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]


def plan(args, device: torch.device, depth: int) -> tuple[list[Setting], dict[str, str]]:
    """Settings to run at `depth`, and why each other one is not run. Named settings always run."""
    if args.settings:
        return [BY_NAME[n] for n in args.settings], {}
    run, skipped = [], {}
    for s in SETTINGS:
        if device.type == "cpu" and s.cuda_only:
            skipped[s.name] = f"on a CPU: {s.cuda_only}"
        elif depth < s.min_depth:
            skipped[s.name] = f"below depth {s.min_depth}: activation memory is not what limits these nets"
        else:
            run.append(s)
    return run, skipped


def parse_args(argv):
    from idmap import cli
    from idmap.overrides import check_overrides

    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="settings:\n  " + "\n  ".join(BY_NAME))
    p.add_argument("--depths", type=int, nargs="+", default=[20, 110, 164, 1001])
    p.add_argument("--iters", type=int, default=100, help="timed iterations per row")
    p.add_argument("--warmup", type=int, default=20,
                   help="untimed iterations first (compile and CUDA graph recording happen here; "
                        "raise it if compiled rows vary)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--settings", nargs="+", choices=list(BY_NAME), metavar="NAME",
                   help="run only these (default: every setting that fits the device and depth; a named "
                        "setting runs even where it would be skipped)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="classic DataLoader workers")
    p.add_argument("--num-train", type=int, default=50_000, help="training images (CIFAR's 50,000)")
    p.add_argument("--widths", type=int, nargs=3, help="stage widths (default: the paper's); small for smoke tests")
    p.add_argument("--block", default="full_preact", help="conf/block/ choice")
    p.add_argument("--out", type=Path, help="also write the table (with its header) to this markdown file")
    p.add_argument("--rows", type=Path, help="also append each row, unrounded, as a JSON line to this file "
                                             "as soon as it is measured (what idmap-gpu-check reads)")
    args = p.parse_args(argv)
    if min(args.iters, args.warmup, args.batch_size, args.num_train) < 1 or args.workers < 0:
        p.error("--iters, --warmup, --batch-size and --num-train must be positive, --workers >= 0")
    if args.batch_size > args.num_train:
        p.error("--batch-size is larger than --num-train")
    if args.rows and not args.rows.parent.is_dir():  # said now, not after the first row's minutes
        p.error(f"--rows {args.rows}: no folder {args.rows.parent}")
    check_overrides([f"block={args.block}"])  # a name, never a path to some YAML
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here", file=sys.stderr)
        return 2
    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")

    lines, skipped, interrupted = header(args, device, argv), {}, False
    try:
        for depth in args.depths:
            settings, skips = plan(args, device, depth)
            base = compose_config(*base_overrides(args, depth))
            runs = [("classic", lambda: classic(base, args, device))]
            if device.type == "cuda":
                runs.append((CLASSIC_STRICT, lambda: classic(base, args, device, strict_fp32=True)))
            else:
                skips = {CLASSIC_STRICT: f"on a CPU: {_NO_TF32}", **skips}
            for name, why in skips.items():  # one note per reason, naming each setting once
                names = skipped.setdefault(why, [])
                if name not in names:
                    names.append(name)
            runs += [(s.name, lambda s=s: project(compose_config(*trainer_overrides(args, depth, s)), args, device))
                     for s in settings]
            baseline = None
            for name, run in runs:
                free(device)
                try:
                    result = run()
                except Interrupted as exc:  # Ctrl-C inside the trainer: stop the benchmark, not the row
                    raise KeyboardInterrupt from exc
                except Exception as exc:  # OOM, compile errors...: report the row and go on
                    result = short_error(exc)
                if name == "classic" and not isinstance(result, str):
                    baseline = result[0]
                rec = row_record(depth, name, result, args.batch_size, baseline)
                lines.append(row(rec))
                print(lines[-1], file=sys.stderr, flush=True)
                if args.rows:  # a line per row as it comes, so a process cut short keeps what it measured
                    with open(args.rows, "a") as f:
                        f.write(json.dumps(rec) + "\n")
    except KeyboardInterrupt:
        interrupted = True
    free(device)
    notes = [f"- not run: {', '.join(names)} ({why})" for why, names in skipped.items()]
    notes += ["- interrupted: the table is incomplete"] if interrupted else []
    text = "\n".join(lines + ([""] + notes if notes else [])) + "\n"
    print(text, end="")
    if args.out:
        from idmap.rundir import write_output

        write_output(args.out, lambda f: f.write(text), mode="w")
    return 130 if interrupted else 0

