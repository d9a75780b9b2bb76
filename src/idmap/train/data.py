"""Data sets as whole uint8 tensors, and the paper's augmentation as batch tensor operations.

The trainer keeps every image on the device (N x 3 x H x W uint8) and normalizes, pads, crops and
flips whole batches there (docs/paper.md, "Training protocol"), so nothing here is a per-image
transform or a DataLoader.

Sources: the official CIFAR-10/100 python archives (downloaded and md5-checked by torchvision,
read here with an unpickler that cannot run code), an image folder (decoded once, then cached),
and a generated set with learnable labels for smoke tests.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import hashlib
import io
import logging
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError

import numpy as np
import torch
import torch.nn.functional as F

from idmap import IdmapError

log = logging.getLogger(__name__)


@dataclass
class ImageData:
    train_x: torch.Tensor  # uint8, N x 3 x H x W, CPU, contiguous
    train_y: torch.Tensor  # int64, N
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    name: str  # cifar10 | cifar100 | imagefolder | synthetic
    label: str  # what reports print
    classes: list[str]


def _image_data(name: str, label: str, classes: list[str], train_x, train_y, test_x, test_y) -> ImageData:
    """Every source ends here, so the trainer's contract (dtypes, layout) holds in one place."""
    if len(classes) < 2 or not len(train_y) or not len(test_y):
        raise IdmapError(f"data set {label or name} has {len(classes)} classes, {len(train_y)} training and "
                         f"{len(test_y)} test images; it needs at least 2 classes and images in both sets")
    t = lambda a, dtype: torch.as_tensor(a, dtype=dtype).contiguous()
    return ImageData(t(train_x, torch.uint8), t(train_y, torch.int64), t(test_x, torch.uint8), t(test_y, torch.int64),
                     len(classes), name, label, list(classes))


def load_dataset(cfg) -> ImageData:
    """The data set `cfg` (a DatasetConfig) names; IdmapError says what is wrong with it."""
    if cfg.name in CIFAR:
        data = _load_cifar(cfg, cfg.name)
    elif cfg.name == "imagefolder":
        data = _load_imagefolder(cfg)
    elif cfg.name == "synthetic":
        data = _synthetic(cfg)
    else:
        raise IdmapError(f"unknown dataset.name={cfg.name!r}; choose one of {', '.join(DATASETS)}")
    return dataclasses.replace(data, label=cfg.label) if cfg.label else data


def _root(cfg) -> Path:
    return Path(os.path.expanduser(str(cfg.root))).resolve()


# --------------------------------------------------------------------------------------------
# CIFAR-10/100: the official python archives
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Archive:
    label: str
    url: str
    md5: str  # of the .tar.gz, as torchvision.datasets.CIFAR10/100 check it
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    names_key: str
    labels_key: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


CIFAR = {
    "cifar10": Archive(
        "CIFAR-10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        "batches.meta", "label_names", "labels"),
    # The paper's CIFAR-100 results use the 100 fine labels.
    "cifar100": Archive(
        "CIFAR-100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python", ("train",), ("test",), "meta", "fine_label_names", "fine_labels"),
}
DATASETS = (*CIFAR, "imagefolder", "synthetic")  # the names dataset.name takes


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray, numeric
    # codecs.encode: bytes in protocol-2 pickles written by Python 3.
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for core in ("numpy.core", "numpy._core"):  # the official files name numpy 1's; numpy 2 writes numpy._core
        allowed |= {(f"{core}.multiarray", "_reconstruct"): multiarray._reconstruct,
                    (f"{core}.multiarray", "scalar"): multiarray.scalar,
                    (f"{core}.numeric", "_frombuffer"): numeric._frombuffer}
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Builds only numpy arrays and plain Python values: a data file must not be able to run code."""

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return self.allowed[module, name]


def _read_pickle(path: Path, extract):
    """Unpickle one CIFAR file and take what we need from it; any failure names the file."""
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="latin1").load()  # latin1: the files were pickled by Python 2
        return extract({(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()})
    except Exception as e:
        raise IdmapError(
            f"{path} is corrupt or not in CIFAR's python format ({type(e).__name__}: {e}); "
            f"delete {path.parent} and download it again"
        ) from None


def _batch(d: dict, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = d["data"], np.asarray(d[labels_key], dtype=np.int64)
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072):
        raise ValueError(f"'data' should be N x 3072 uint8, got {getattr(x, 'shape', type(x))}")
    if y.shape != (len(x),) or (len(y) and not 0 <= y.min() <= y.max() < num_classes):
        raise ValueError(f"{len(x)} images but {len(y)} labels, or labels outside 0..{num_classes - 1}")
    # Each row is the R plane, then G, then B, each 32x32 row-major: exactly N x 3 x 32 x 32.
    return x.reshape(-1, 3, 32, 32), y


def download_and_extract_archive(*args, **kwargs):
    # torchvision is imported on the first download only: importing it costs every process that
    # loads data (each run, each test, each step of the GPU check) a second or more.
    from torchvision.datasets.utils import download_and_extract_archive as fetch

    return fetch(*args, **kwargs)


def _download(a: Archive, root: Path) -> None:
    archive = root / a.filename
    yourself = f"download it yourself and extract it into {root}, or set dataset.root=<dir> (or IDMAP_DATA)"
    log.info("downloading %s into %s", a.url, root)
    try:
        download_and_extract_archive(a.url, str(root), filename=a.filename, md5=a.md5)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise IdmapError(f"{a.label}: {archive} is corrupt or truncated ({e}); delete it and run again, "
                         f"or {yourself}") from None
    except RuntimeError:  # torchvision's md5 check of what it downloaded
        raise IdmapError(f"{a.label}: {archive} does not have the official md5 {a.md5} (corrupt or truncated "
                         f"download); delete it and run again, or {yourself}") from None
    except OSError as e:
        offline = isinstance(e, (URLError, ConnectionError, TimeoutError)) and not isinstance(e, HTTPError)
        why = f"no network to download {a.url}" if offline else f"could not download {a.url}"
        raise IdmapError(f"{a.label}: looked in {root / a.folder}; {why} ({getattr(e, 'reason', e)}); "
                         f"{yourself}") from None


def _load_cifar(cfg, name: str) -> ImageData:
    a, root = CIFAR[name], _root(cfg)
    folder = root / a.folder
    missing = lambda: [f for f in (a.meta, *a.train, *a.test) if not (folder / f).is_file()]
    if missing():
        if not cfg.download:
            raise IdmapError(
                f"{a.label}: {folder / missing()[0]} not found; set dataset.download=true to fetch {a.url}, "
                f"or point dataset.root (or IDMAP_DATA) at the folder that holds {a.folder}/"
            )
        _download(a, root)
        if missing():
            raise IdmapError(f"{a.label}: {root / a.filename} did not contain {folder / missing()[0]}; "
                             f"delete it and run again")
    as_str = lambda n: n.decode() if isinstance(n, bytes) else str(n)
    classes = _read_pickle(folder / a.meta, lambda d: [as_str(n) for n in d[a.names_key]])
    read = lambda files: [_read_pickle(folder / f, lambda d: _batch(d, a.labels_key, len(classes))) for f in files]
    (train_x, train_y), (test_x, test_y) = (map(np.concatenate, zip(*read(files))) for files in (a.train, a.test))
    return _image_data(name, a.label, classes, train_x, train_y, test_x, test_y)


# --------------------------------------------------------------------------------------------
# Image folder: root/{train,test}/<class>/<image>, decoded once and cached
# --------------------------------------------------------------------------------------------

_CACHE_VERSION = 1


def _files(top: str) -> list[os.DirEntry]:
    """Every non-hidden file under `top` (os.scandir: pathlib was most of a cached load's time)."""
    out = []
    for e in os.scandir(top):
        if e.name.startswith("."):
            continue
        if e.is_dir():
            out += _files(e.path)
        elif e.is_file():
            out.append(e)
    return out


def _list_split(root: Path, split: str) -> dict[str, list[os.DirEntry]]:
    d = root / split
    if not d.is_dir():
        raise IdmapError(f"image folder {root} has no {split}/ folder; expected {root}/train/<class>/* and "
                         f"{root}/test/<class>/*: set dataset.root=<dir with train/ and test/>")
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    files = {c: sorted(_files(str(d / c)), key=lambda e: e.path) for c in classes}
    if not any(files.values()):
        raise IdmapError(f"{d} holds no images; expected {d}/<class>/<image>")
    empty = [c for c, images in files.items() if not images]
    if empty:  # a class no image teaches (or tests) would count in the model's outputs all the same
        raise IdmapError(f"{d / empty[0]} holds no images; add its images or remove the folder (a class "
                         f"needs images in both train/ and test/)")
    return files


def _decode(path: str, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        # Reading the bytes first is ~1.3x faster than letting PIL open the file for tiny images.
        with open(path, "rb") as f, Image.open(io.BytesIO(f.read())) as im:
            if im.size == (size, size):
                # Grayscale, palette, CMYK, RGBA (alpha dropped): every image becomes 3-channel RGB.
                return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
            got = im.size
    except Exception as e:
        why = "not a format PIL reads" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise IdmapError(f"cannot read image {path} ({why})") from None
    raise IdmapError(f"{path} is {got[0]}x{got[1]} pixels; every image must be {size}x{size} (dataset.image_size)")


def _decode_all(paths: list[str], size: int) -> torch.Tensor:
    # One process: PIL holds the GIL on these tiny images (a thread pool was 2x slower), and worker
    # processes saved at most ~20% on 2 cores, once per data set since the result is cached.
    hwc = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(paths):
        hwc[i] = _decode(p, size)
    return torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()


def _cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("IDMAP_CACHE") or "~/.cache/idmap"))


def _load_cache(path: Path) -> dict | None:
    try:
        c = torch.load(path, weights_only=True)
        ok = isinstance(c["classes"], list) and all(
            c[f"{s}_x"].dtype == torch.uint8 and c[f"{s}_x"].ndim == 4
            and c[f"{s}_y"].dtype == torch.int64 and c[f"{s}_y"].shape == c[f"{s}_x"].shape[:1]
            for s in ("train", "test"))
        if not ok:
            raise ValueError("unexpected contents")
        return c
    except FileNotFoundError:
        return None
    except Exception as e:  # a corrupt or foreign cache is rebuilt, never trusted
        log.warning("ignoring unreadable cache %s (%s: %s)", path, type(e).__name__, e)
        return None


def _save_cache(path: Path, content: dict, stale: str) -> None:
    """Write atomically (concurrent runs never see half a file) and drop older caches matching `stale`."""
    from idmap.rundir import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(content, f))
        for old in path.parent.glob(glob.escape(stale) + "*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
    except (OSError, RuntimeError, IdmapError) as e:  # torch.save reports a full disk as RuntimeError
        log.warning("could not cache decoded images in %s (%s); set IDMAP_CACHE to a writable folder", path, e)


def _load_imagefolder(cfg) -> ImageData:
    root, size = _root(cfg), int(cfg.image_size)
    if not root.is_dir():
        raise IdmapError(f"image folder {root} does not exist; set dataset.root=<dir with train/ and test/>")
    splits = {s: _list_split(root, s) for s in ("train", "test")}
    if splits["train"].keys() != splits["test"].keys():
        only = lambda a, b: ", ".join(sorted(splits[a].keys() - splits[b].keys())) or "-"
        raise IdmapError(f"image folder {root}: train and test classes differ (only in train: {only('train', 'test')}; "
                         f"only in test: {only('test', 'train')})")
    classes = list(splits["train"])
    files = {s: [(e, y) for y, c in enumerate(classes) for e in splits[s][c]] for s in splits}

    # The key changes when any file is added, removed, resized or touched, or the image size changes.
    h = hashlib.sha256(f"v{_CACHE_VERSION} size={size}\n".encode())
    for e, _ in files["train"] + files["test"]:
        st = e.stat()
        h.update(f"{e.path[len(str(root)):]}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    folder = f"imagefolder-{root.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}-"
    cache = _cache_dir() / f"{folder}{h.hexdigest()[:16]}.pt"

    content = _load_cache(cache)
    if content is None:
        log.info("decoding %d images in %s (cached in %s)", sum(map(len, files.values())), root, cache)
        content = {"classes": classes}
        for s, pairs in files.items():
            content[f"{s}_x"] = _decode_all([e.path for e, _ in pairs], size)
            content[f"{s}_y"] = torch.tensor([y for _, y in pairs], dtype=torch.int64)
        _save_cache(cache, content, stale=folder)
    return _image_data("imagefolder", f"image folder {root.name}", content["classes"],
                       content["train_x"], content["train_y"], content["test_x"], content["test_y"])


# --------------------------------------------------------------------------------------------
# Synthetic: learnable labels for smoke tests
# --------------------------------------------------------------------------------------------

_SYNTHETIC_SEED = 1603_05027  # the paper's arXiv id; fixed so every run sees the same data


def _generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(_SYNTHETIC_SEED + zlib.crc32(repr(key).encode()))


def _synthetic(cfg) -> ImageData:
    """Each class is a colour plus a smooth texture (8-pixel features: a 4-pixel shift or a flip keeps
    most of it); images add a colour jitter and pixel noise. Seeded by the set's shape, not the run's
    seed, so seeds vary the training and not the data; the test set does not depend on num_train."""
    k, s = int(cfg.num_classes), int(cfg.image_size)
    g = _generator("templates", k, s)
    colour = torch.rand(k, 3, 1, 1, generator=g) * 0.6 + 0.2
    texture = F.interpolate(torch.randn(k, 3, 4, 4, generator=g), size=(s, s), mode="bicubic", align_corners=False)
    templates = colour + 0.15 * texture

    def split(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(name, k, s, n)
        y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]  # balanced classes
        x = torch.empty(n, 3, s, s, dtype=torch.uint8)
        for i in range(0, n, 10_000):  # bounded float memory for large sets
            yi = y[i : i + 10_000]
            jitter = 0.05 * torch.randn(len(yi), 3, 1, 1, generator=g)
            img = templates[yi] + jitter + 0.1 * torch.randn(len(yi), 3, s, s, generator=g)
            x[i : i + 10_000] = img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return x, y

    (train_x, train_y), (test_x, test_y) = split("train", int(cfg.num_train)), split("test", int(cfg.num_test))
    return _image_data("synthetic", "synthetic", [f"class_{i}" for i in range(k)], train_x, train_y, test_x, test_y)


# --------------------------------------------------------------------------------------------
# Normalization and augmentation (docs/paper.md, "Training protocol")
# --------------------------------------------------------------------------------------------

NORMALIZATIONS = ("channel", "pixel")


def normalization(train_x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) on the 0..1 scale, from the training set only.

    channel: per-channel mean and std, shapes (1,3,1,1), as the Torch code (125.3/123.0/113.9 and
        63.0/62.1/66.7 on the 0-255 scale for CIFAR-10).
    pixel: v1's per-pixel mean, shape (1,3,H,W). v1 only subtracts it; we also divide by one global
        std (the root mean square of x - mean over all pixels and channels, shape (1,1,1,1)) so the
        inputs have unit scale like the channel mode's, and one learning rate and init fit both.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, not {mode!r}")
    n = len(train_x)
    s = torch.zeros(train_x.shape[1:], dtype=torch.float64, device=train_x.device)
    ss = torch.zeros_like(s)
    for i in range(0, n, 10_000):  # float64 sums of integers are exact; 10k images = 250 MB at a time
        c = train_x[i : i + 10_000].to(torch.float64)
        s += c.sum(0)
        ss += c.square_().sum(0)
    if mode == "channel":
        mean = s.sum((1, 2)) / (n * s[0].numel())
        std = (ss.sum((1, 2)) / (n * s[0].numel()) - mean.square()).sqrt()
        mean, std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
    else:
        mean = (s / n).unsqueeze(0)
        std = (ss / n - mean.square()).mean().sqrt().view(1, 1, 1, 1)
    return (mean / 255).float(), (std / 255).float()


def normalize(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """float32 (x/255 - mean)/std on x's device, as (x - 255 mean)/(255 std): one new tensor."""
    dev, f32 = x_uint8.device, torch.float32
    return (x_uint8 - 255 * mean.to(dev, f32)).div_(255 * std.to(dev, f32))


def model_input(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Un-augmented images as a model reads them: normalised, in the run's memory format."""
    return normalize(x_uint8, mean, std).contiguous(memory_format=memory_format)


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Image i: its H x W window at offset (dy[i], dx[i]) of x zero-padded by `pad`, mirrored where flip[i].

    x is already normalized, so the zero padding is the mean colour, as in the Torch code (which
    normalizes, then pads). One gather for the batch: no per-image loop, no host sync.
    """
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = dy.long()[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = dx.long()[:, None] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flip.bool()[:, None], cols.flip(1), cols)
    i = torch.arange(n, device=x.device)[:, None, None, None]
    ch = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[i, ch, rows[:, None, :, None], cols[:, None, None, :]]


def draw_crop_flip(n: int, generator: torch.Generator, pad: int = 4):
    """The paper's augmentation draws for n images: crop offsets uniform over the (2 pad + 1)^2
    positions of the padded image, and a coin-flip mirror; on the generator's device."""
    dev = generator.device
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev) for _ in range(2))
    return dy, dx, torch.rand(n, generator=generator, device=dev) < 0.5


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    return crop_flip(x, *draw_crop_flip(len(x), generator, pad), pad)
