"""The GPU check's steps that run CUDA work in a child process of their own (idmap.perf.gpu_check kills it
at its cap): machine, smoke, resume, fused, ghost BN. Each adds rows to `ctx` (gpu_check.Context)
and runs the project's own code: idmap.run.launch.run on configs composed from conf/ as train.py
composes them, not a copy of the loop; what it times, it times as the trainer does (its flags from
runtime.configure, one clock around many steps)."""

from __future__ import annotations

import math
import os
import platform
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

from idmap.perf.bench import free, short_error
from idmap.config import compose_config
from idmap.perf.gpu_check_sizes import FAST, NO_COMPILE, NO_CUDA, PACKED, train_overrides
from idmap.perf.plan import time_step


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _device(ctx) -> torch.device:
    return torch.device("cuda", 0) if ctx.cuda else torch.device("cpu")


def step_seconds(fn, device: torch.device, iters: int = 10, warmup: int = 3) -> float:
    """Seconds per call of `fn` over `iters` calls in a row after `warmup`: two CUDA events (a clock
    on a CPU) around all of them and no sync between calls, as the trainer's throughput windows."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / iters


# --------------------------------------------------------------------------------------------------
# machine: what the GPU is, and the two ceilings measured
# --------------------------------------------------------------------------------------------------
def machine(ctx) -> None:
    device = _device(ctx)
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                python=platform.python_version(), cpus=os.cpu_count())
    name = "CPU"
    if ctx.cuda:
        p = torch.cuda.get_device_properties(device)
        name = p.name
        info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    gpus=torch.cuda.device_count(), sms=p.multi_processor_count)
    ctx.add("versions and device", "ok" if ctx.cuda else NO_CUDA, **info)
    where = "GPU" if ctx.cuda else "CPU (rehearsal: not a GPU number)"
    n = ctx.sizes.copy_bytes
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)  # random bytes, never zeros
    dst = torch.empty_like(src)
    seconds = step_seconds(lambda: dst.copy_(src), device)
    copy_gbs = 2 * n / seconds / 1e9  # bytes read plus bytes written
    ctx.add(f"copy of {n / 2**20:.0f} MiB on the {where}", gb_per_s=copy_gbs, median_ms=1000 * seconds)
    m = ctx.sizes.matmul_n
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in range(2))
    seconds = step_seconds(lambda: a @ b, device)
    tflops = 2 * m**3 / seconds / 1e12
    ctx.add(f"{m}^3 {str(dtype)[6:]} matrix product on the {where}", tflop_per_s=tflops, median_ms=1000 * seconds)
    ctx.headline = f"{name}: copy {copy_gbs:,.0f} GB/s, {str(dtype)[6:]} matmul {tflops:,.1f} TFLOP/s"


# --------------------------------------------------------------------------------------------------
# Runs through the project's entry below Hydra (launch.run), one row each
# --------------------------------------------------------------------------------------------------
SAME = 2e-3  # mean train loss of two runs that differ in summation order only (as tests/test_bench.py)
SAME_BF16 = 3e-2  # the same in bf16, whose rounding is coarser


class Row(NamedTuple):
    name: str
    overrides: list[str]
    skip: str = ""  # why it does not run here
    ref: str = ""  # a row of the same maths: the two mean train losses must agree to `rtol`
    rtol: float = 0.0


def train_row(ctx, row: Row, overrides: list[str]) -> dict:
    """One short run in a fresh directory; ok when it completes with a finite training loss that
    agrees with its reference row's, where it has one."""
    from idmap.run.launch import run
    from idmap.rundir import Status, read_metrics

    free(_device(ctx))
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=ctx.work) as d:
        try:
            summary = run(compose_config(*overrides), d, choices={})
            metrics = read_metrics(Path(d))
        except Exception as exc:
            return ctx.add(row.name, f"failed: {short_error(exc)}", seconds=time.time() - t0)
    loss = metrics[-1]["train_loss"] if metrics else math.nan
    ok = summary["status"] == Status.COMPLETED and math.isfinite(loss)
    status, apart = ("ok" if ok else f"failed: {summary['status']}, train loss {loss}"), None
    if ok and row.ref:
        ref = next((i.get("train_loss") for i in ctx.items if i["name"] == row.ref), None)
        apart = abs(loss - ref) / abs(ref) if ref else None
        if apart is None or apart > row.rtol:
            status = f"failed: train loss {loss:.6g} against {ref} in {row.ref!r}, more than {row.rtol:g} apart"
    return ctx.add(row.name, status, seconds=time.time() - t0, train_loss=loss, apart=apart,
                   images_per_sec=summary.get("images_per_sec"), peak_mib=summary.get("peak_memory_mb"))


def smoke_rows(ctx) -> list[Row]:
    """Each ordering, each shortcut, a bottleneck net, each speed switch: every eager row first,
    so that a compile that runs past the cap costs only compiled rows. A switch that keeps the maths
    is checked against the row without it; compiled rows use a small net that compiles in seconds,
    against its eager run (as tests/test_bench.py's GPU test, which the check does not run)."""
    from idmap.models.resnet import ORDERINGS, SHORTCUTS

    s, cuda_only = ctx.sizes, "" if ctx.cuda else NO_CUDA
    compile_ok = "" if ctx.cuda else NO_COMPILE
    ckpt, base, small, small_fast = "model.checkpointing=true", "ordering full_preact", "small net", "small net, fast"
    rows = [Row(f"ordering {b}", [f"block={b}"]) for b in ORDERINGS]
    rows += [Row(f"shortcut {n}", [f"shortcut={n}"]) for n in SHORTCUTS]
    rows += [Row("bottleneck", list(s.deep)),
             Row("tf32", ["trainer.precision=tf32"], cuda_only),
             Row("bf16", ["trainer.precision=bf16"]),
             Row("channels_last", ["trainer.channels_last=true"], ref=base, rtol=SAME),
             Row("fused SGD", ["optim.impl=fused"], ref=base, rtol=SAME),
             Row("checkpointing, bottleneck", [*s.deep, ckpt], ref="bottleneck", rtol=SAME),
             Row(small, list(s.compile_net), compile_ok),  # the compiled rows' references
             Row(small_fast, [*s.compile_net, *FAST], compile_ok),
             Row("compile default", [*s.compile_net, "trainer.compile=default"], compile_ok, small, SAME),
             Row("compile reduce-overhead, fast", [*s.compile_net, *FAST, "trainer.compile=reduce-overhead"],
                 cuda_only, small_fast, SAME_BF16),
             Row("compile + checkpointing", [*s.compile_net, ckpt, "trainer.compile=default"], compile_ok, small, SAME)]
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    two = "" if gpus >= 2 else f"skipped: needs 2 GPUs, this machine has {gpus}"
    rows += [Row(f"DDP x2 + compile {mode}", ["trainer.world_size=2", f"trainer.compile={mode}"], two)
             for mode in ("reduce-overhead", "max-autotune")]
    return rows


def smoke(ctx) -> None:
    s = ctx.sizes
    base = [*train_overrides(s, s.smoke_iters, s.smoke_iters), *s.resnet20]
    rows = smoke_rows(ctx)
    for row in rows:
        if row.skip:
            ctx.add(row.name, row.skip)
        elif ctx.left() < 3:
            ctx.add(row.name, "skipped: the step's time cap was spent")
        else:
            train_row(ctx, row, [*base, *row.overrides])
    ran = [i for i in ctx.items if not i["status"].startswith("skipped")]
    ctx.headline = f"{sum(i['status'] == 'ok' for i in ran)} of {len(ran)} runs ok, {len(rows) - len(ran)} skipped"


# --------------------------------------------------------------------------------------------------
# resume: stopped by a signal after a checkpoint, resumed, compared with an uninterrupted run
# --------------------------------------------------------------------------------------------------
def _signal_after(path: Path, deadline: float) -> None:
    """SIGTERM to this process once `path` exists: a preemption right after a checkpoint."""
    def watch():
        while not path.exists():
            if time.time() > deadline:
                return
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def _difference(a: dict, b: dict) -> tuple[bool, float]:
    """(bit-exact, max |a - b|) over the model's tensors and momentum buffers."""
    ta = [v for v in a["model"].values()] + [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    tb = [v for v in b["model"].values()] + [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    exact = all(torch.equal(x, y) for x, y in zip(ta, tb)) and len(ta) == len(tb)
    return exact, max((x.double() - y.double()).abs().max().item() for x, y in zip(ta, tb))


def resume_pair(ctx, name: str, overrides: list[str]) -> dict:
    """A run stopped right after a checkpoint and resumed must end bit for bit as the run that was
    never stopped: deterministic kernels only, since with cuDNN autotuning two uninterrupted runs
    differ too, and no tolerance tells a broken resume from that."""
    from idmap.train.checkpoint import load_checkpoint
    from idmap.run.launch import run
    from idmap.rundir import CHECKPOINT
    from idmap.train.runtime import Interrupted

    whole, parts = (Path(tempfile.mkdtemp(dir=ctx.work)) for _ in range(2))
    run(compose_config(*overrides), whole, choices={})
    _signal_after(parts / CHECKPOINT, ctx.deadline)
    # A signal that comes after the run has ended (a slow watcher) must not end this process.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        run(compose_config(*overrides), parts, choices={})
        return ctx.add(name, "failed: the run finished before the signal reached it")
    except Interrupted:
        stopped = load_checkpoint(parts)["iteration"]
    finally:
        signal.signal(signal.SIGTERM, previous)
    run(compose_config(*overrides, "trainer.resume=true"), parts, choices={})
    exact, max_abs = _difference(load_checkpoint(whole), load_checkpoint(parts))
    return ctx.add(name, "ok" if exact else f"failed: not bit-exact (max |dw| {max_abs:.3g})", stopped_at=stopped,
                   iterations=ctx.sizes.resume_iters, max_abs_diff=max_abs)


def resume(ctx) -> None:
    # cuBLAS reads its workspace setting when it starts, which is before runtime.configure would set it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    s = ctx.sizes
    name = "deterministic: bit-exact"
    overrides = [*train_overrides(s, s.resume_iters, s.resume_every), *s.resnet20,
                 f"trainer.checkpoint_every={s.resume_every}", "trainer.deterministic=true"]
    try:
        resume_pair(ctx, name, overrides)
    except Exception as exc:
        ctx.add(name, f"failed: {short_error(exc)}")
    finally:
        torch.use_deterministic_algorithms(False)  # trainer.deterministic=true set it for this process
    ctx.headline = f"{name}: {ctx.items[-1]['status']}"


# --------------------------------------------------------------------------------------------------
# ghost-bn: ghost BN in one pass against the old chunked version (idmap.models.norm.to_chunked)
# --------------------------------------------------------------------------------------------------
def ghost_bn(ctx) -> None:
    """The trainer's own build and step (plan.time_step) timed twice, the second time with the
    chunked BN (model.ghost_bn=chunked) as bench's chunked rows: only the BN modules differ."""
    s, speedups = ctx.sizes, []
    for net in (s.resnet20, s.deep):
        overrides = (*train_overrides(s, 1, 1), *net, "trainer.precision=bf16", "trainer.channels_last=true")
        cfg = compose_config(*overrides)
        label = f"ghost BN ({' '.join(net)}, bn_batch {cfg.model.bn_batch}, bf16, channels_last)"
        t_new = time_step(cfg, s.ghost_iters, warmup=3)[0]
        t_old = time_step(compose_config(*overrides, "model.ghost_bn=chunked"), s.ghost_iters, warmup=3)[0]
        ctx.add(label, ms_per_iter_one_pass=1000 * t_new, ms_per_iter_chunked=1000 * t_old, speedup=t_old / t_new)
        speedups.append(f"{' '.join(net)}: one pass {t_old / t_new:.2f}x chunked")
    ctx.headline = "; ".join(speedups)


# --------------------------------------------------------------------------------------------------
# fused: N ResNet-20s trained as one model (idmap.perf.fused), aggregate images/s
# --------------------------------------------------------------------------------------------------
def fused(ctx) -> None:
    from idmap.train.runtime import configure
    from idmap.train.trainer import run_inputs

    s, device = ctx.sizes, _device(ctx)
    cfg = compose_config(*train_overrides(s, 1, 1), *s.resnet20, *PACKED)  # as the packing runs
    configure(cfg.trainer, cfg.seed)  # the trainer's flags: cuDNN autotuning, TF32 as the precision says
    data = run_inputs(cfg, device, s.batch)
    rates = {}
    for n in s.fused_nets:
        if ctx.left() < 5:
            ctx.add(f"{n} nets as one", "skipped: the step's time cap was spent")
            continue
        try:
            rates[n] = _fused_rate(ctx, cfg, data, n)
            ctx.add(f"{n} nets as one", images_per_sec=rates[n], ms_per_step=1000 * n * s.batch / rates[n])
        except Exception as exc:
            ctx.add(f"{n} nets as one", f"failed: {short_error(exc)}")
    if rates:
        top = max(rates)
        ctx.headline = f"{top} nets: {rates[top]:,.0f} img/s" + (
            f" ({rates[top] / rates[1]:.2f}x one net)" if 1 in rates and top != 1 else "")


def _fused_rate(ctx, cfg, data, n: int) -> float:
    """Aggregate images/s of n ResNets trained as one: each its own weights and data order."""
    from idmap.perf.fused import FusedNets
    from idmap.models.resnet import build_resnet, model_kwargs
    from idmap.train.runtime import autocast
    from idmap.train.state import BatchStream

    s, device = ctx.sizes, _device(ctx)
    torch.manual_seed(cfg.seed)
    nets = FusedNets([build_resnet(**model_kwargs(cfg, data.info.num_classes)).to(device) for _ in range(n)])
    opt = torch.optim.SGD(nets.params.values(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    # CPU generators, as the trainer's: each net its own data order, drawn as a run would draw it.
    streams = [BatchStream(len(data.train_y), torch.Generator().manual_seed(cfg.seed + i)) for i in range(n)]

    def step():
        batches = [data.batch(st, s.batch, slice(None)) for st in streams]
        x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
        with autocast(cfg.trainer.precision, device):
            loss = nets.loss(nets(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return n * s.batch / step_seconds(step, device, iters=s.fused_iters)


def jpeg_cache(ctx) -> None:
    """Decodes (and caches) the JPEG copy once, before runs that would each decode it at once."""
    from idmap.train.data import load_dataset

    t0 = time.time()
    ds = load_dataset(compose_config("dataset=cifar10_jpeg", f"dataset.root={ctx.data}").dataset)
    ctx.add("decode the JPEG copy", seconds=time.time() - t0, train=len(ds.train_y), test=len(ds.test_y))
