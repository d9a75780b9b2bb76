"""Where and how a process computes: the device, the backend's numeric flags, and the signals that
ask a run to stop."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import signal
import threading
import warnings

import torch
import torch.distributed as dist

from idmap import IdmapError

log = logging.getLogger("idmap")


# The device names a run and every script take.
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# The kernel choices a run may make (trainer.precision, trainer.compile, optim.impl; their one home).
PRECISIONS = ("fp32", "tf32", "bf16")
COMPILE_MODES = {"none": None, "default": {}, "reduce-overhead": {"mode": "reduce-overhead"},
                 "max-autotune": {"mode": "max-autotune"}}  # torch.compile's keyword arguments
SGD_IMPLS = {"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one. In a process group each process trains on the GPU
    launch.py set as its current one (its local rank). IdmapError for a name that is no device
    here (trainer.device is its setting; the scripts' --device says the same)."""
    if not DEVICE.fullmatch(str(name)):
        raise IdmapError(f"device {name!r} is not one; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise IdmapError(f"trainer.device={name} but CUDA is not available here; use trainer.device=cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise IdmapError(f"trainer.device={name} but this machine has {torch.cuda.device_count()} GPU(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if name == "cuda" or (name.startswith("cuda") and dist.is_initialized()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The device as a reader of results needs it named: the GPU's model, or the CPU's model with what
    bf16 runs on (AMX tiles, AVX-512 bf16 dot products) and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = _cpuinfo()
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                 platform.processor() or "CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    units = [name for flag, name in (("amx_bf16", "AMX bf16"), ("avx512_bf16", "AVX-512 bf16"),
                                     ("avx512f", "AVX-512")) if flag in flags]
    threads = torch.get_num_threads()
    return f"{model} ({', '.join(units[:2]) or 'no AVX-512'}; {threads} thread{'s' * (threads != 1)})"


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def configure(trainer, seed: int) -> None:
    """Numeric flags and the seed, before anything is built. Each flag is set either way, so a run
    in a process that ran another (a joblib worker, a test session) starts as in a fresh one."""
    torch.use_deterministic_algorithms(bool(trainer.deterministic))
    if trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_tf32(trainer.precision)
    torch.backends.cudnn.benchmark = not trainer.deterministic
    torch.manual_seed(seed)


def set_tf32(precision: str) -> None:
    """TF32 for trainer.precision=tf32 only: fp32 means fp32, though cuDNN would use TF32 for
    convolutions by default. `default` is what PyTorch ships (TF32 convolutions, fp32 matrix
    products), the benchmark's classic loop. Through the fp32_precision settings where torch has
    them (2.9+ deprecates allow_tf32), else the allow_tf32 flags."""
    conv = "tf32" if precision in ("tf32", "default") else "ieee"
    matmul = "tf32" if precision == "tf32" else "ieee"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*allow_tf32")
        # Also where the new settings decide: torch raises when code reads an allow_tf32 flag that
        # disagrees with them (inductor's convolution templates read cuDNN's).
        torch.backends.cudnn.allow_tf32 = conv == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = matmul == "tf32"
    if _fp32_precision_api():
        # conv and rnn alike: torch refuses to read cuDNN's flag when the two differ.
        torch.backends.cudnn.conv.fp32_precision = torch.backends.cudnn.rnn.fp32_precision = conv
        torch.backends.cuda.matmul.fp32_precision = matmul


def _fp32_precision_api() -> bool:
    return hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast (fp32 master weights) for trainer.precision=bf16; fp32 and tf32 need none."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


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


class Interrupted(Exception):
    """A run stopped by a signal after checkpointing."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
