"""The GPU check's steps that run CUDA work in a child process of their own (idmap.gpu_check kills it
at its cap): machine, smoke, resume, fused, and the bench's ghost BN timing. Each adds rows to
`ctx` (gpu_check.Context) and runs the project's own code: idmap.launch.run on configs composed
from conf/ as train.py composes them, not a copy of the loop."""

from __future__ import annotations

import math
import os
import platform
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from idmap.bench import _chunked_ghost_bn, free, short_error
from idmap.config import compose_config
from idmap.gpu_check_sizes import FAST, NO_CUDA, train_overrides
from idmap.plan import time_step

NO_COMPILE = "skipped: rehearsal (inductor takes ~25 s a model on a 2-core CPU)"
RESUME_RTOL = 1e-2  # ||w_resumed - w|| / ||w|| allowed where kernels may differ between the runs


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _device(ctx) -> torch.device:
    return torch.device("cuda", 0) if ctx.cuda else torch.device("cpu")


def timed(fn, device: torch.device, reps: int = 10, warmup: int = 3) -> float:
    """Median seconds of `fn()` after a warm-up, with CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    seconds = timed(lambda: dst.copy_(src), device)
    copy_gbs = 2 * n / seconds / 1e9  # bytes read plus bytes written
    ctx.add(f"copy of {n / 2**20:.0f} MiB on the {where}", gb_per_s=copy_gbs, median_ms=1000 * seconds)
    m = ctx.sizes.matmul_n
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in range(2))
    seconds = timed(lambda: a @ b, device)
    tflops = 2 * m**3 / seconds / 1e12
    ctx.add(f"{m}^3 {str(dtype)[6:]} matrix product on the {where}", tflop_per_s=tflops, median_ms=1000 * seconds)
    ctx.headline = f"{name}: copy {copy_gbs:,.0f} GB/s, {str(dtype)[6:]} matmul {tflops:,.1f} TFLOP/s"


# --------------------------------------------------------------------------------------------------
# Runs through the project's entry below Hydra (launch.run), one row each
# --------------------------------------------------------------------------------------------------
def train_row(ctx, name: str, overrides: list[str]) -> dict:
    """One short run in a fresh directory; ok when it completes with a finite training loss."""
    from idmap.launch import run
    from idmap.rundir import read_metrics

    free(_device(ctx))
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=ctx.work) as d:
        try:
            summary = run(compose_config(*overrides), d, choices={})
            metrics = read_metrics(Path(d))
        except Exception as exc:
            return ctx.add(name, f"failed: {short_error(exc)}", seconds=time.time() - t0)
    loss = metrics[-1]["train_loss"] if metrics else math.nan
    ok = summary["status"] == "completed" and math.isfinite(loss)
    return ctx.add(name, "ok" if ok else f"failed: {summary['status']}, train loss {loss}",
                   seconds=time.time() - t0, train_loss=loss, images_per_sec=summary.get("images_per_sec"),
                   peak_mib=summary.get("peak_memory_mb"))


def smoke_rows(ctx) -> list[tuple[str, list[str], str]]:
    """(row, overrides, why it is skipped here or ''): each ordering, each shortcut, a bottleneck
    net, each speed switch, and the compiled 2-process DDP model (finding 12)."""
    from idmap.models import ORDERINGS, SHORTCUTS

    s, cuda_only = ctx.sizes, "" if ctx.cuda else NO_CUDA
    compile_ok = "" if ctx.cuda else NO_COMPILE
    deep_ckpt = [*s.deep, "model.checkpointing=true"]
    rows = [(f"ordering {b}", [f"block={b}"], "") for b in ORDERINGS]
    rows += [(f"shortcut {n}", [f"shortcut={n}"], "") for n in SHORTCUTS]
    rows += [("bottleneck " + " ".join(s.deep), list(s.deep), ""),
             ("tf32", ["trainer.precision=tf32"], cuda_only),
             ("bf16", ["trainer.precision=bf16"], ""),
             ("channels_last", ["trainer.channels_last=true"], ""),
             ("fused SGD", ["optim.impl=fused"], ""),
             ("compile default", ["trainer.compile=default"], compile_ok),
             ("compile reduce-overhead", ["trainer.compile=reduce-overhead"], cuda_only),
             ("checkpointing, deep net", deep_ckpt, ""),
             # Finding 2's combination does not depend on depth; a shallow net compiles in less time.
             ("compile + checkpointing", ["model.checkpointing=true", "trainer.compile=default"], compile_ok)]
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    two = "" if gpus >= 2 else f"skipped: needs 2 GPUs, this machine has {gpus}"
    rows += [(f"DDP x2 + compile {mode}", ["trainer.world_size=2", f"trainer.compile={mode}"], two)
             for mode in ("reduce-overhead", "max-autotune")]
    return rows


def smoke(ctx) -> None:
    s = ctx.sizes
    base = [*train_overrides(s, s.smoke_iters, s.smoke_iters), *s.resnet20]
    rows = smoke_rows(ctx)
    for name, overrides, skip in rows:
        if skip:
            ctx.add(name, skip)
        elif ctx.left() < 3:
            ctx.add(name, "skipped: the step's time cap was spent")
        else:
            train_row(ctx, name, [*base, *overrides])
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


def _difference(a: dict, b: dict) -> tuple[bool, float, float]:
    """(bit-exact, max |a - b|, ||a - b|| / ||a||) over the model's tensors and momentum buffers."""
    ta = [v for v in a["model"].values()] + [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    tb = [v for v in b["model"].values()] + [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    exact = all(torch.equal(x, y) for x, y in zip(ta, tb)) and len(ta) == len(tb)
    fa = [x.double().flatten() for x in ta if x.is_floating_point()]
    fb = [y.double().flatten() for y in tb if y.is_floating_point()]
    diff = torch.cat([x - y for x, y in zip(fa, fb)])
    return exact, diff.abs().max().item(), (diff.norm() / torch.cat(fa).norm()).item()


def resume_pair(ctx, name: str, overrides: list[str]) -> dict:
    from idmap.checkpoint import load_checkpoint
    from idmap.launch import run
    from idmap.rundir import CHECKPOINT
    from idmap.runtime import Interrupted

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
    exact, max_abs, rel = _difference(load_checkpoint(whole), load_checkpoint(parts))
    deterministic = "trainer.deterministic=true" in overrides
    if deterministic:
        status = "ok" if exact else f"failed: not bit-exact (max |dw| {max_abs:.3g})"
    else:
        status = "ok" if rel <= RESUME_RTOL else f"failed: ||dw||/||w|| {rel:.3g} > {RESUME_RTOL}"
    return ctx.add(name, status, stopped_at=stopped, iterations=ctx.sizes.resume_iters, bit_exact=exact,
                   max_abs_diff=max_abs, rel_diff=rel, tolerance="bit-exact" if deterministic else RESUME_RTOL)


def resume(ctx) -> None:
    # cuBLAS reads its workspace setting when it starts: before the first pair, so that the
    # deterministic pair after it gets cuBLAS's deterministic workspace (runtime.configure sets it too late).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    s = ctx.sizes
    base = [*train_overrides(s, s.resume_iters, s.resume_every), *s.resnet20,
            f"trainer.checkpoint_every={s.resume_every}"]
    # Default settings first: a deterministic run may leave deterministic algorithms switched on.
    for det in ("false", "true"):
        name = "deterministic: bit-exact" if det == "true" else "default (cuDNN autotuning): up to rounding"
        try:
            resume_pair(ctx, name, [*base, f"trainer.deterministic={det}"])
        except Exception as exc:
            ctx.add(name, f"failed: {short_error(exc)}")
    torch.use_deterministic_algorithms(False)
    ctx.headline = "; ".join(f"{i['name'].split(':')[0]}: {i['status']}" for i in ctx.items)


# --------------------------------------------------------------------------------------------------
# bench: ghost BN in one pass against the old chunked version (idmap.norm.to_chunked)
# --------------------------------------------------------------------------------------------------
def ghost_bn(ctx) -> None:
    """The trainer's own build and step (plan.time_step) timed twice, the second time with the
    chunked BN swapped in as bench's chunked rows do: only the BN modules differ."""
    s = ctx.sizes
    for net in (s.resnet20, s.deep):
        cfg = compose_config(*train_overrides(s, 1, 1), *net, "trainer.precision=bf16",
                             "trainer.channels_last=true")
        label = f"ghost BN ({' '.join(net)}, bn_batch {cfg.model.bn_batch}, bf16, channels_last)"
        t_new = time_step(cfg, s.ghost_iters, warmup=3)[0]
        with _chunked_ghost_bn(True):
            t_old = time_step(cfg, s.ghost_iters, warmup=3)[0]
        ctx.add(label, ms_per_iter_one_pass=1000 * t_new, ms_per_iter_chunked=1000 * t_old, speedup=t_old / t_new)


# --------------------------------------------------------------------------------------------------
# fused: N ResNet-20s trained as one model (idmap.fused), aggregate images/s
# --------------------------------------------------------------------------------------------------
def fused(ctx) -> None:
    from idmap.trainer import DeviceData

    s, device = ctx.sizes, _device(ctx)
    # bf16 and fused SGD as in the packing rows; the stacked 5-D batch stays in the default layout.
    cfg = compose_config(*train_overrides(s, 1, 1), *s.resnet20, *FAST, "trainer.channels_last=false")
    data = DeviceData(cfg, device, s.batch)
    rates = {}
    for n in s.fused_nets:
        if ctx.left() < 5:
            ctx.add(f"{n} nets", "skipped: the step's time cap was spent")
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
    from idmap.fused import FusedNets
    from idmap.models import build_resnet, model_kwargs
    from idmap.runtime import autocast
    from idmap.state import BatchStream

    s, device = ctx.sizes, _device(ctx)
    torch.manual_seed(cfg.seed)
    nets = FusedNets([build_resnet(**model_kwargs(cfg, data.info.num_classes)).to(device) for _ in range(n)])
    opt = torch.optim.SGD(nets.params.values(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    # CPU generators, as the trainer's: each net its own data order, drawn as a run would draw it.
    streams = [BatchStream(len(data.train_y), torch.Generator().manual_seed(cfg.seed + i)) for i in range(n)]

    def step():
        batches = [data.batch(st, s.batch, slice(None)) for st in streams]
        x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
        with autocast("bf16", device):
            loss = nets.loss(nets(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return n * s.batch / timed(step, device, reps=s.fused_iters, warmup=3)


def jpeg_cache(ctx) -> None:
    """Decodes (and caches) the JPEG copy once, before runs that would each decode it at once."""
    from idmap.data import load_dataset

    t0 = time.time()
    ds = load_dataset(compose_config("dataset=cifar10_jpeg", f"dataset.root={ctx.data}").dataset)
    ctx.add("decode the JPEG copy", seconds=time.time() - t0, train=len(ds.train_y), test=len(ds.test_y))
