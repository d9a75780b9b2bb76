import collections
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

# One OpenMP thread, unless the caller chose: the tests train tiny nets, on which a second thread
# mostly spins (a 120-iteration TINY run took twice the time and 2.5x the CPU with two threads on the
# busy 2-core development machine; the tests that start processes side by side set it already).
# Set before torch is imported, so that the processes the tests start inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from idmap.config import compose_config, register_configs  # noqa: E402
from slurm_cluster import slurm  # noqa: E402,F401  (the session's SLURM cluster fixture)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"
JPEG_COPY = SHARED_DATA / "cifar10-jpeg.tar.gz"

# A run that takes seconds on a CPU: a ResNet-8 on a small synthetic set, warm-up off so the
# short run learns.
TINY = [
    "dataset=synthetic",
    "dataset.num_train=512",
    "dataset.num_test=256",
    "dataset.image_size=16",
    "model.depth=8",
    "model.widths=[8,16,32]",
    "trainer.batch_size=32",
    "trainer.max_iters=40",
    "trainer.eval_every=20",
    "trainer.checkpoint_every=20",
    "trainer.log_every=10",
    "trainer.eval_batch_size=256",
    "trainer.device=cpu",
    "trainer.progress=false",
    "optim.warmup_iters=0",
]
# A run with two evaluations and two checkpoints, the start of most tests of resuming and of run folders.
SHORT = [*TINY, "trainer.max_iters=4", "trainer.eval_every=2", "trainer.checkpoint_every=2"]
# A data-parallel run that a second start method must reproduce to the number (deterministic).
DDP = [*TINY, "trainer.max_iters=6", "trainer.eval_every=3", "trainer.checkpoint_every=3",
       "trainer.deterministic=true"]

register_configs()


def make_cfg(*overrides: str):
    """The run config that `python train.py <overrides>` would get."""
    return compose_config(*overrides)


def run_train(*args: str, check: bool = True, timeout: float = 300, env: dict | None = None):
    """`python train.py ARGS` in a subprocess, as a user would run it."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def tiny_cfg():
    return make_cfg(*TINY)


class Made:
    """A run or sweep folder that train.py made once for the session (each start costs seconds of
    imports), given to each test as it was made, at the place it was made (its .hydra record names
    that place): a test may change it without another test seeing the change."""

    def __init__(self, path: Path, proc: subprocess.CompletedProcess):
        self.path, self.proc, self._copy = path, proc, path.with_name(path.name + ".made")
        shutil.copytree(path, self._copy, symlinks=True)

    def fresh(self) -> Path:
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.copytree(self._copy, self.path, symlinks=True)
        return self.path


@pytest.fixture(scope="session")
def short_run(tmp_path_factory) -> Made:
    """`python train.py SHORT`, completed."""
    run_dir = tmp_path_factory.mktemp("short") / "run"
    return Made(run_dir, run_train(*SHORT, f"hydra.run.dir={run_dir}"))


@pytest.fixture(scope="session")
def short_sweep(tmp_path_factory) -> Made:
    """`python train.py -m SHORT seed=1,2`, both jobs completed; `.proc` holds what it printed."""
    sweep = tmp_path_factory.mktemp("short") / "sweep"
    return Made(sweep, run_train("-m", *SHORT, "seed=1,2", f"hydra.sweep.dir={sweep}"))


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> Path:
    """`python train.py DDP trainer.world_size=2`: two spawned gloo processes training one run.
    Read only: tests/test_train.py checks its files, tests/test_launch.py compares torchrun's with it."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    run_train(*DDP, "trainer.world_size=2", f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.fixture(scope="session")
def jpeg_copy(tmp_path_factory) -> Path:
    if not JPEG_COPY.exists():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz is absent")
    # Extracted once per tarball and kept beside pytest's numbered temp dirs: writing 60,000 files
    # takes ~15 s, but deleting them took minutes here (ext4 with online discard), so runs reuse it.
    st = JPEG_COPY.stat()
    root = tmp_path_factory.getbasetemp().parent / f"idmap-cifar10-jpeg-{st.st_size}-{st.st_mtime_ns}"
    if not root.exists():
        tmp = Path(tempfile.mkdtemp(dir=root.parent))
        with tarfile.open(JPEG_COPY) as tar:
            tar.extractall(tmp, filter="data")
        try:
            tmp.rename(root)  # atomic: a concurrent run sees all of it or none
        except OSError:
            shutil.rmtree(tmp)  # another run got there first
    return root / "cifar10-jpeg"


JpegDecoded = collections.namedtuple("JpegDecoded", "config cache dataset seconds")


@pytest.fixture(scope="session")
def jpeg_decoded(jpeg_copy, tmp_path_factory) -> JpegDecoded:
    """The JPEG copy decoded once for the session into an image cache of its own (IDMAP_CACHE),
    with the data set and the seconds decoding took: decoding 60,000 images was most of each test
    that reads them (tests/test_data.py checks the decoding against a load from this cache)."""
    from idmap.train import data
    from idmap.config import DatasetConfig

    config = DatasetConfig(name="imagefolder", root=str(jpeg_copy), label="CIFAR-10 (JPEG copy)",
                           download=False)
    cache = tmp_path_factory.mktemp("jpeg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IDMAP_CACHE", str(cache))
        start = time.perf_counter()
        dataset = data.load_dataset(config)
        return JpegDecoded(config, cache, dataset, time.perf_counter() - start)
