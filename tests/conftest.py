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

from idmap.config import compose_config, register_configs
from slurm_cluster import slurm  # noqa: F401  (the session's SLURM cluster fixture)

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
    from idmap import data
    from idmap.config import DatasetConfig

    config = DatasetConfig(name="imagefolder", root=str(jpeg_copy), label="CIFAR-10 (JPEG copy)",
                           download=False)
    cache = tmp_path_factory.mktemp("jpeg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IDMAP_CACHE", str(cache))
        start = time.perf_counter()
        dataset = data.load_dataset(config)
        return JpegDecoded(config, cache, dataset, time.perf_counter() - start)
