"""The sizes of the GPU check (idmap.gpu_check): the GPU's, and the rehearsal's tiny ones that run
the same steps on a 2-core CPU in about a minute. Everything else is the same code."""

from __future__ import annotations

from dataclasses import dataclass

# The speed switches a sweep would use; compile is left to the rows that test it, so that a compile
# failure cannot cost a run that outlives the call.
FAST = ("trainer.precision=bf16", "trainer.channels_last=true", "optim.impl=fused")
QUIET = ("trainer.progress=false", "trainer.checkpoint_every=1000000000")
NO_CUDA = "skipped: needs CUDA (rehearsal on a CPU)"


@dataclass(frozen=True)
class Sizes:
    device: str
    data: tuple[str, ...]  # synthetic data for the rows that time or smoke-test
    resnet20: tuple[str, ...]  # the paper's ResNet-20 (or the rehearsal's stand-in)
    deep: tuple[str, ...]  # a bottleneck net deep enough for activation checkpointing to matter
    batch: int
    smoke_iters: int
    resume_iters: int  # a run this long is stopped after its first checkpoint, every `resume_every`
    resume_every: int
    copy_bytes: int  # machine: the device-to-device copy
    matmul_n: int  # machine: an n x n x n matrix product
    bench_groups: tuple[tuple[str, tuple[str, ...]], ...]  # (label, scripts/bench.py arguments; --device is `device`)
    ghost_iters: int
    packing_levels: tuple[int, ...]
    packing_iters: tuple[int, int]  # warm-up (includes start-up skew), then timed iterations
    fused_nets: tuple[int, ...]
    fused_iters: int
    fidelity_iters: int
    long_iters: int | None  # None: the paper's 64k


_CL_FUSED = "bf16+channels_last+fused_sgd"
_TINY_BENCH = ("--iters", "2", "--warmup", "1", "--num-train", "256", "--batch-size", "16", "--workers", "0",
               "--widths", "4", "8", "16")

GPU = Sizes(
    device="cuda",
    data=("dataset=synthetic", "dataset.num_train=5000", "dataset.num_test=1000", "trainer.eval_batch_size=1000"),
    resnet20=("depth=20",),
    deep=("depth=164",),
    batch=128,
    smoke_iters=20,
    resume_iters=200,
    resume_every=20,
    copy_bytes=2**31,
    matmul_n=8192,
    bench_groups=(
        ("depth 20", ("--depths", "20", "--iters", "100", "--warmup", "30", "--settings", "fp32", "tf32",
                      _CL_FUSED, f"{_CL_FUSED}+compile", f"{_CL_FUSED}+compile-reduce-overhead")),
        ("depth 110", ("--depths", "110", "--iters", "50", "--warmup", "30", "--settings", "fp32",
                       _CL_FUSED, f"{_CL_FUSED}+compile")),
        # Few iterations: one step of ResNet-1001 is tens of ms; the point is memory and the
        # price of recomputation, not a steady state.
        ("depth 1001", ("--depths", "1001", "--iters", "8", "--warmup", "4", "--workers", "8", "--settings",
                        _CL_FUSED, f"{_CL_FUSED}+checkpointing")),
    ),
    ghost_iters=50,
    packing_levels=(1, 2, 4, 8),
    packing_iters=(100, 300),
    fused_nets=(1, 4, 8),
    fused_iters=50,
    fidelity_iters=3000,
    long_iters=None,
)

REHEARSAL = Sizes(
    device="cpu",
    data=("dataset=synthetic", "dataset.num_train=256", "dataset.num_test=64", "dataset.image_size=16",
          "trainer.eval_batch_size=64", "model.widths=[4,8,16]", "model.bn_batch=16"),
    resnet20=("model.depth=8",),
    deep=("model.depth=11", "model.unit=bottleneck"),
    batch=32,
    smoke_iters=2,
    resume_iters=6,
    resume_every=2,
    copy_bytes=2**24,
    matmul_n=256,
    bench_groups=(("depth 8", ("--depths", "8", *_TINY_BENCH, "--settings", "fp32", _CL_FUSED,
                               f"{_CL_FUSED}+checkpointing")),),
    ghost_iters=2,
    packing_levels=(2,),  # the same code as 1, 4 and 8 runs; each level costs process start-ups
    packing_iters=(2, 4),
    fused_nets=(2,),
    fused_iters=2,
    fidelity_iters=8,
    long_iters=4,
)


def train_overrides(sizes: Sizes, iters: int, every: int) -> list[str]:
    """A short run of the trainer on the check's synthetic data: `iters` steps, evaluating (and
    closing a throughput window) every `every`."""
    return [*sizes.data, f"trainer.device={sizes.device}", f"trainer.batch_size={sizes.batch}",
            f"trainer.max_iters={iters}", f"trainer.eval_every={every}", f"trainer.log_every={every}", *QUIET]
