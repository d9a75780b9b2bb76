"""The sizes of the GPU check (idmap.perf.gpu_check): the GPU's, and the rehearsal's tiny ones that run
the same steps on a 2-core CPU in about a minute. Everything else is the same code."""

from __future__ import annotations

from dataclasses import dataclass

# The speed switches a sweep would use; compile is left to the rows that test it, so that a compile
# failure costs its row only.
FAST = ("trainer.precision=bf16", "trainer.channels_last=true", "optim.impl=fused")
# Packing and the fused probe on equal terms: the same precision and optimizer, and the default
# layout, since the probe's stacked N x B x C x H x W batch has no channels_last form.
PACKED = ("trainer.precision=bf16", "trainer.channels_last=false", "optim.impl=fused")
QUIET = ("trainer.progress=false", "trainer.checkpoint_every=1000000000")
NO_CUDA = "skipped: needs CUDA (rehearsal on a CPU)"
NO_COMPILE = "skipped: rehearsal (inductor takes ~25 s a model on a 2-core CPU)"


@dataclass(frozen=True)
class Sizes:
    device: str
    data: tuple[str, ...]  # synthetic data for the rows that time or smoke-test
    resnet20: tuple[str, ...]  # the paper's ResNet-20 (or the rehearsal's stand-in)
    deep: tuple[str, ...]  # a bottleneck net deep enough for activation checkpointing to matter
    compile_net: tuple[str, ...]  # smoke's compiled rows: small, so that each compiles in seconds
    batch: int
    smoke_iters: int
    resume_iters: int  # a run this long is stopped after its first checkpoint, every `resume_every`
    resume_every: int
    copy_bytes: int  # machine: the device-to-device copy
    matmul_n: int  # machine: an n x n x n matrix product
    bench: dict[str, tuple[str, ...]]  # bench step -> scripts/bench.py arguments (--device is `device`)
    ghost_iters: int
    packing_levels: tuple[int, ...]
    # Warm-up (autotuning, first steps), timed (longer than the runs' start-up skew, so that they
    # overlap), evaluation every.
    packing_iters: tuple[int, int, int]
    packing_cut_s: float | None  # rehearsal: one level killed this soon, before any run evaluates
    fused_nets: tuple[int, ...]
    fused_iters: int
    fidelity_iters: int


_CL_FUSED = "bf16+channels_last+fused_sgd"
# Synthetic images for bench.py: 5,000 are a few seconds of ResNet-110 and are made in well under a
# second, where its default 50,000 would be made again for every row.
_GPU_BENCH = ("--num-train", "5000", "--workers", "8")
_TINY_BENCH = ("--depths", "8", "--iters", "2", "--warmup", "1", "--num-train", "256", "--batch-size", "16",
               "--workers", "0", "--widths", "4", "8", "16", "--settings")

GPU = Sizes(
    device="cuda",
    data=("dataset=synthetic", "dataset.num_train=5000", "dataset.num_test=1000", "trainer.eval_batch_size=1000"),
    resnet20=("depth=20",),
    deep=("depth=164",),
    compile_net=("model.depth=8",),
    batch=128,
    smoke_iters=20,
    resume_iters=200,
    resume_every=20,
    copy_bytes=2**31,
    matmul_n=8192,
    bench={
        "bench-20": ("--depths", "20", "--iters", "100", "--warmup", "30", *_GPU_BENCH, "--settings",
                     _CL_FUSED, f"{_CL_FUSED}+compile-reduce-overhead"),
        "bench-110": ("--depths", "110", "--iters", "50", "--warmup", "30", *_GPU_BENCH, "--settings",
                      _CL_FUSED, f"{_CL_FUSED}+compile"),
        # Few iterations: one step of ResNet-1001 is about a tenth of a second; the point is memory
        # and the price of recomputation, not a steady state.
        "bench-1001": ("--depths", "1001", "--iters", "8", "--warmup", "4", *_GPU_BENCH, "--settings",
                       _CL_FUSED, f"{_CL_FUSED}+checkpointing"),
    },
    ghost_iters=50,
    packing_levels=(1, 4, 8),
    packing_iters=(150, 500, 50),
    packing_cut_s=None,
    fused_nets=(1, 4, 8),
    fused_iters=50,
    fidelity_iters=1000,
)

REHEARSAL = Sizes(
    device="cpu",
    data=("dataset=synthetic", "dataset.num_train=256", "dataset.num_test=64", "dataset.image_size=16",
          "trainer.eval_batch_size=64", "model.widths=[4,8,16]", "model.bn_batch=16"),
    resnet20=("model.depth=8",),
    deep=("model.depth=11", "model.unit=bottleneck"),
    compile_net=("model.depth=8",),
    batch=32,
    smoke_iters=2,
    resume_iters=6,
    resume_every=2,
    copy_bytes=2**24,
    matmul_n=256,
    # One row each: the same code as the GPU's rows; each row costs a trainer start on the CPU.
    bench={"bench-20": (*_TINY_BENCH, _CL_FUSED), "bench-110": (*_TINY_BENCH, "fp32"),
           "bench-1001": (*_TINY_BENCH, f"{_CL_FUSED}+checkpointing")},
    ghost_iters=2,
    packing_levels=(2,),  # the same code as 1, 4 and 8 runs; each level costs process start-ups
    packing_iters=(5, 100, 25),
    packing_cut_s=1.0,  # under the start of a Python that imports torch
    fused_nets=(2,),
    fused_iters=2,
    fidelity_iters=8,
)


def train_overrides(sizes: Sizes, iters: int, every: int) -> list[str]:
    """A short run of the trainer on the check's synthetic data: `iters` steps, evaluating (and
    closing a throughput window) every `every`."""
    return [*sizes.data, f"trainer.device={sizes.device}", f"trainer.batch_size={sizes.batch}",
            f"trainer.max_iters={iters}", f"trainer.eval_every={every}", f"trainer.log_every={every}", *QUIET]
