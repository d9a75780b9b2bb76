"""Data sets load as whole uint8 tensors; the paper's augmentation is exact, uniform and batched."""

import dataclasses
import hashlib
import io
import os
import pickle
import re
import socket
import tarfile
import time
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from idmap import IdmapError
from idmap.train import data
from idmap.config import DatasetConfig



def cfg(**kw) -> DatasetConfig:
    return DatasetConfig(**{"download": False, **kw})


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args):
        raise AssertionError("data tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


# --------------------------------------------------------------------------------------------
# CIFAR: files the test writes in the official python layout
# --------------------------------------------------------------------------------------------

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root: Path, name: str, per_file: int = 4, seed: int = 0) -> dict:
    """Tiny files in the official layout (N x 3072 uint8 rows: R plane, G plane, B plane), pickled
    with protocol 2 as the originals; CIFAR-100's with bytes keys, as Python-3 tools re-save them."""
    a, rng = data.CIFAR[name], np.random.default_rng(seed)
    k = 10 if name == "cifar10" else 100
    folder = root / a.folder
    folder.mkdir(parents=True)
    key = (lambda s: s.encode()) if name == "cifar100" else (lambda s: s)
    names = CIFAR10_NAMES if name == "cifar10" else [f"fine{i}" for i in range(100)]

    def dump(file, d):
        (folder / file).write_bytes(pickle.dumps({key(field): v for field, v in d.items()}, protocol=2))

    dump(a.meta, {a.names_key: names, "num_vis": 3072})
    written = {}
    for split, files in (("train", a.train), ("test", a.test)):
        xs, ys = [], []
        for f in files:
            x = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            y = rng.integers(0, k, per_file).tolist()
            extra = {"coarse_labels": [0] * per_file} if name == "cifar100" else {}
            filenames = [f"{i}.png" for i in range(per_file)]
            dump(f, {"batch_label": f, a.labels_key: y, "data": x, "filenames": filenames, **extra})
            xs.append(x)
            ys.extend(y)
        written[split] = (np.concatenate(xs), np.array(ys))
    written["classes"] = names
    return written


def test_cifar10_loads_from_the_official_pickle_layout(tmp_path):
    w = write_cifar(tmp_path, "cifar10")
    ds = data.load_dataset(cfg(name="cifar10", root=str(tmp_path)))
    assert (ds.name, ds.label, ds.num_classes, ds.classes) == ("cifar10", "CIFAR-10", 10, CIFAR10_NAMES)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)  # 5 batches + test
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert all(t.is_contiguous() for t in (ds.train_x, ds.train_y, ds.test_x, ds.test_y))
    assert ds.train_y.tolist() == w["train"][1].tolist() and ds.test_y.tolist() == w["test"][1].tolist()
    # Row layout: byte c*1024 + r*32 + col is channel c (R, G, B), row r, column col.
    x = w["train"][0]
    for i, c, r, col in [(0, 0, 0, 0), (3, 1, 1, 2), (7, 2, 31, 30), (19, 2, 5, 17)]:
        assert ds.train_x[i, c, r, col] == x[i, c * 1024 + r * 32 + col]


def test_cifar100_reads_the_100_fine_labels(tmp_path):
    w = write_cifar(tmp_path, "cifar100", per_file=7)
    ds = data.load_dataset(cfg(name="cifar100", root=str(tmp_path)))
    assert (ds.name, ds.label, ds.num_classes) == ("cifar100", "CIFAR-100", 100)
    assert ds.classes == w["classes"]
    assert ds.train_x.shape == (7, 3, 32, 32) and ds.test_x.shape == (7, 3, 32, 32)
    assert ds.train_y.tolist() == w["train"][1].tolist()
    assert torch.equal(ds.test_x.reshape(7, -1), torch.from_numpy(w["test"][0]))


def test_a_label_in_the_config_replaces_the_data_sets_own(tmp_path):
    write_cifar(tmp_path, "cifar10")
    assert data.load_dataset(cfg(name="cifar10", root=str(tmp_path), label="my CIFAR")).label == "my CIFAR"


def test_the_archives_are_the_official_ones_torchvision_verifies():
    for name, tv in (("cifar10", torchvision.datasets.CIFAR10), ("cifar100", torchvision.datasets.CIFAR100)):
        a = data.CIFAR[name]
        assert (a.url, a.md5, a.filename, a.folder) == (tv.url, tv.tgz_md5, tv.filename, tv.base_folder)


def test_download_fetches_the_official_archive_into_root(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):  # what torchvision does, minus the network
        calls.append((url, root, filename, md5))
        write_cifar(Path(root), "cifar10")

    monkeypatch.setattr(data, "download_and_extract_archive", fake_download)
    ds = data.load_dataset(cfg(name="cifar10", root=str(tmp_path), download=True))
    a = data.CIFAR["cifar10"]
    assert calls == [(a.url, str(tmp_path), a.filename, a.md5)] and len(ds.train_y) == 20
    data.load_dataset(cfg(name="cifar10", root=str(tmp_path), download=True))
    assert len(calls) == 1  # present files are not fetched again


def test_missing_files_without_download_name_the_path(tmp_path):
    with pytest.raises(IdmapError, match="cifar-10-batches-py.*dataset.download=true"):
        data.load_dataset(cfg(name="cifar10", root=str(tmp_path / "nowhere")))


def test_offline_download_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data, "download_and_extract_archive", offline)
    with pytest.raises(IdmapError) as e:
        data.load_dataset(cfg(name="cifar100", root=str(tmp_path), download=True))
    msg = str(e.value)
    assert "\n" not in msg
    for part in (str(tmp_path / "cifar-100-python"), "no network to download", data.CIFAR["cifar100"].url,
                 "download it yourself", "IDMAP_DATA"):
        assert part in msg


def test_a_download_that_fails_the_md5_check_is_reported(tmp_path, monkeypatch):
    def bad_md5(url, root, filename, md5):  # torchvision's check after a truncated download
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(data, "download_and_extract_archive", bad_md5)
    with pytest.raises(IdmapError, match="official md5"):
        data.load_dataset(cfg(name="cifar10", root=str(tmp_path), download=True))


def test_a_truncated_archive_is_reported(tmp_path, monkeypatch):
    # A real .tar.gz cut in half, placed where the download goes. Its md5 stands in for the official
    # one, so torchvision accepts the file without the network and fails while extracting.
    src = tmp_path / "src"
    write_cifar(src, "cifar10")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    root = tmp_path / "root"
    root.mkdir()
    archive = root / data.CIFAR["cifar10"].filename
    archive.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(data.CIFAR, "cifar10", dataclasses.replace(data.CIFAR["cifar10"], md5=md5))
    with pytest.raises(IdmapError, match=re.escape(f"{archive} is corrupt or truncated")):
        data.load_dataset(cfg(name="cifar10", root=str(root), download=True))


def test_a_truncated_pickle_is_named(tmp_path):
    write_cifar(tmp_path, "cifar10")
    f = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(IdmapError, match="data_batch_3 is corrupt"):
        data.load_dataset(cfg(name="cifar10", root=str(tmp_path)))


def test_a_data_file_cannot_run_code(tmp_path):
    write_cifar(tmp_path, "cifar10")
    pwned = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(pwned),)

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Payload()}, protocol=2))
    with pytest.raises(IdmapError, match="test_batch.*refusing to load"):
        data.load_dataset(cfg(name="cifar10", root=str(tmp_path)))
    assert not pwned.exists()


def test_an_unknown_data_set_name_lists_the_valid_ones():
    with pytest.raises(IdmapError, match="cifar10, cifar100, imagefolder, synthetic"):
        data.load_dataset(cfg(name="mnist"))


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def rgb(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_folder(root: Path, images: dict) -> None:
    """images: {"train/cat/a.png": HxWx3 or HxW array or PIL image}."""
    for rel, im in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (im if isinstance(im, Image.Image) else Image.fromarray(im)).save(root / rel)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("IDMAP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "pets"
    gray = np.random.default_rng(9).integers(0, 256, (32, 32), dtype=np.uint8)
    write_folder(root, {
        "train/dog/0.png": rgb(0), "train/dog/1.png": rgb(1),
        "train/cat/0.png": rgb(2), "train/cat/gray.png": gray,
        "train/cat/palette.png": Image.fromarray(rgb(3)).convert("P"),
        "train/cat/rgba.png": np.dstack([rgb(4), np.full((32, 32), 7, np.uint8)]),
        "test/cat/0.png": rgb(5), "test/dog/0.png": rgb(6),
    })
    (root / "train" / "dog" / ".DS_Store").write_bytes(b"\0")  # hidden files are not images
    return root


def test_an_image_folder_loads_sorted_classes_and_rgb_pixels(folder, cache):
    ds = data.load_dataset(cfg(name="imagefolder", root=str(folder)))
    assert (ds.name, ds.label, ds.classes, ds.num_classes) == ("imagefolder", "image folder pets", ["cat", "dog"], 2)
    assert ds.train_y.tolist() == [0, 0, 0, 0, 1, 1] and ds.test_y.tolist() == [0, 1]
    assert ds.train_x.shape == (6, 3, 32, 32) and ds.train_x.dtype == torch.uint8 and ds.train_x.is_contiguous()
    hwc = lambda t: t.permute(1, 2, 0).numpy()
    # cat/: 0.png, gray.png, palette.png, rgba.png in name order.
    assert np.array_equal(hwc(ds.train_x[0]), rgb(2))
    gray = ds.train_x[1]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # grayscale becomes RGB
    assert np.array_equal(hwc(ds.train_x[3]), rgb(4))  # alpha dropped
    assert np.array_equal(hwc(ds.train_x[5]), rgb(1)) and np.array_equal(hwc(ds.test_x[1]), rgb(6))


def test_an_image_of_the_wrong_size_is_named_with_its_size(folder, cache):
    write_folder(folder, {"train/dog/big.png": rgb(0, size=40)})
    with pytest.raises(IdmapError, match=r"train/dog/big.png is 40x40 pixels; every image must be 32x32"):
        data.load_dataset(cfg(name="imagefolder", root=str(folder)))


def test_an_unreadable_image_is_named(folder, cache):
    (folder / "test" / "dog" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(IdmapError, match=r"cannot read image .*test/dog/broken.jpg"):
        data.load_dataset(cfg(name="imagefolder", root=str(folder)))


def test_train_and_test_classes_must_agree(folder, cache):
    write_folder(folder, {"test/bird/0.png": rgb(0)})
    with pytest.raises(IdmapError, match=r"classes differ \(only in train: -; only in test: bird\)"):
        data.load_dataset(cfg(name="imagefolder", root=str(folder)))


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "does not exist"),
    (lambda root: write_folder(root, {"train/a/0.png": rgb(0)}), "has no test/ folder"),
    (lambda root: (root / "train" / "a").mkdir(parents=True) or (root / "test").mkdir(), "holds no images"),
])
def test_a_folder_without_train_and_test_images_is_explained(tmp_path, cache, make, message):
    make(tmp_path / "x")
    with pytest.raises(IdmapError, match=message):
        data.load_dataset(cfg(name="imagefolder", root=str(tmp_path / "x")))


def test_decoded_images_are_cached_and_the_cache_follows_the_files(folder, cache, monkeypatch):
    first = data.load_dataset(cfg(name="imagefolder", root=str(folder)))
    assert len(list(cache.glob("*.pt"))) == 1

    with monkeypatch.context() as m:
        m.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded again despite the cache"))
        second = data.load_dataset(cfg(name="imagefolder", root=str(folder)))
    assert torch.equal(first.train_x, second.train_x) and second.classes == first.classes

    write_folder(folder, {"train/dog/0.png": rgb(100)})
    os.utime(folder / "train" / "dog" / "0.png", ns=(1, 1))
    third = data.load_dataset(cfg(name="imagefolder", root=str(folder)))
    assert np.array_equal(third.train_x[4].permute(1, 2, 0).numpy(), rgb(100))
    assert len(list(cache.glob("*.pt"))) == 1  # the stale cache is gone


def test_a_corrupt_cache_is_ignored_and_rebuilt(folder, cache):
    first = data.load_dataset(cfg(name="imagefolder", root=str(folder)))
    (path,) = cache.glob("*.pt")
    path.write_bytes(path.read_bytes()[:1000])
    assert torch.equal(data.load_dataset(cfg(name="imagefolder", root=str(folder))).train_x, first.train_x)
    assert torch.equal(torch.load(path, weights_only=True)["train_x"], first.train_x)


def test_the_jpeg_copy_of_cifar10_loads_as_an_image_folder(jpeg_decoded, monkeypatch):
    # Decoded by the session's fixture (its first load, into a fresh cache); this is the second.
    c, ds = jpeg_decoded.config, jpeg_decoded.dataset
    assert c == cfg(name="imagefolder", root=c.root, label="CIFAR-10 (JPEG copy)")
    monkeypatch.setenv("IDMAP_CACHE", str(jpeg_decoded.cache))
    t1 = time.perf_counter()
    again = data.load_dataset(c)
    t2 = time.perf_counter()
    print(f"JPEG copy: decoded in {jpeg_decoded.seconds:.1f} s, from the cache in {t2 - t1:.1f} s")
    assert ds.train_x.shape == (50_000, 3, 32, 32) and ds.test_x.shape == (10_000, 3, 32, 32)
    assert ds.classes == CIFAR10_NAMES and ds.label == "CIFAR-10 (JPEG copy)"
    assert torch.bincount(ds.train_y).tolist() == [5000] * 10 and torch.bincount(ds.test_y).tolist() == [1000] * 10
    mean, std = data.normalization(ds.train_x, "channel")
    # Close to the Torch code's CIFAR-10 statistics; JPEG lowers the std by about 1%.
    assert torch.allclose(mean.flatten() * 255, torch.tensor([125.3, 123.0, 113.9]), atol=1.0)
    assert torch.allclose(std.flatten() * 255, torch.tensor([63.0, 62.1, 66.7]), rtol=0.03)
    assert torch.equal(again.train_x, ds.train_x) and t2 - t1 < jpeg_decoded.seconds


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------


def test_synthetic_data_is_fixed_balanced_and_shaped_by_the_config():
    c = cfg(name="synthetic", num_train=600, num_test=200, num_classes=6, image_size=16)
    a, b = data.load_dataset(c), data.load_dataset(c)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("train_x", "train_y", "test_x", "test_y"))
    assert (a.name, a.label, a.num_classes, len(a.classes)) == ("synthetic", "synthetic", 6, 6)
    assert a.train_x.shape == (600, 3, 16, 16) and a.test_x.shape == (200, 3, 16, 16) and a.train_x.dtype == torch.uint8
    assert torch.bincount(a.train_y).tolist() == [100] * 6 and a.test_y.min() >= 0 and a.test_y.max() < 6
    # More training images leave the test set as it was.
    assert torch.equal(data.load_dataset(dataclasses.replace(c, num_train=900)).test_x, a.test_x)


def test_synthetic_labels_survive_the_papers_augmentation():
    ds = data.load_dataset(cfg(name="synthetic", num_train=2000, num_test=500))
    mean, std = data.normalization(ds.train_x, "channel")
    x = data.normalize(ds.train_x, mean, std)
    centroids = torch.stack([x[ds.train_y == k].mean(0) for k in range(10)]).flatten(1)
    test = data.random_crop_flip(data.normalize(ds.test_x, mean, std), torch.Generator().manual_seed(0))
    error = (torch.cdist(test.flatten(1), centroids).argmin(1) != ds.test_y).float().mean()
    assert error < 0.3  # chance is 0.9: a network finds these labels in a few dozen SGD steps


# --------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------


def test_channel_normalization_is_the_training_sets_per_channel_mean_and_std():
    # 25,000 images cross the chunk boundaries of the exact float64 sums.
    x = torch.randint(0, 256, (25_000, 3, 4, 4), dtype=torch.uint8)
    x[:, 2] //= 2
    mean, std = data.normalization(x, "channel")
    ref = x.numpy().astype(np.float64) / 255
    assert mean.shape == std.shape == (1, 3, 1, 1) and mean.dtype == std.dtype == torch.float32
    np.testing.assert_allclose(mean.flatten(), ref.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std.flatten(), ref.std(axis=(0, 2, 3)), rtol=1e-6)


def test_pixel_normalization_subtracts_v1s_per_pixel_mean_and_gives_unit_scale():
    x = torch.randint(0, 256, (500, 3, 8, 8), dtype=torch.uint8)
    x[:, :, :4] //= 4  # a mean image with structure
    mean, std = data.normalization(x, "pixel")
    assert mean.shape == (1, 3, 8, 8) and std.shape == (1, 1, 1, 1)
    z = data.normalize(x, mean, std).double()
    assert z.mean(0).abs().max() < 1e-5 and abs(z.square().mean().sqrt() - 1) < 1e-5


def test_an_unknown_normalization_names_the_valid_ones():
    with pytest.raises(ValueError, match="channel, pixel"):
        data.normalization(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "zca")


def test_normalize_is_x_over_255_minus_mean_over_std():
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    mean, std = torch.rand(1, 3, 1, 1), torch.rand(1, 3, 1, 1) + 0.1
    out = data.normalize(x, mean, std)
    assert out.dtype == torch.float32 and torch.allclose(out, (x / 255 - mean) / std, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Augmentation: pad 4 with zeros, random 32x32 crop, random horizontal flip
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [4, 2])
def test_crop_flip_equals_padding_slicing_and_flipping_each_image(pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 12, 10, generator=g)
    dy, dx = (torch.randint(0, 2 * pad + 1, (64,), generator=g) for _ in range(2))
    flip = torch.rand(64, generator=g) < 0.5
    expected = []
    for i in range(64):
        img = F.pad(x[i], (pad, pad, pad, pad))[:, dy[i] : dy[i] + 12, dx[i] : dx[i] + 10]
        expected.append(img.flip(-1) if flip[i] else img)
    assert torch.equal(data.crop_flip(x, dy, dx, flip, pad), torch.stack(expected))


def test_the_centre_crop_without_flip_is_the_image_itself():
    x = torch.randn(4, 3, 32, 32)
    centre, no, yes = torch.full((4,), 4), torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
    assert torch.equal(data.crop_flip(x, centre, centre, no), x)
    assert torch.equal(data.crop_flip(x, centre, centre, yes), x.flip(-1))


def test_random_crops_are_uniform_over_the_81_offsets_and_flips_are_fair(monkeypatch):
    draws = []
    monkeypatch.setattr(data, "crop_flip", lambda x, dy, dx, flip, pad: draws.append((dy, dx, flip)) or x)
    g, n = torch.Generator().manual_seed(0), 200_000
    out = data.random_crop_flip(torch.zeros(n, 1, 1, 1), g)
    assert out.shape == (n, 1, 1, 1)
    (dy, dx, flip), = draws
    counts = torch.bincount(dy * 9 + dx, minlength=81).double()
    assert len(counts) == 81
    chi2 = ((counts - n / 81).square() / (n / 81)).sum()
    assert chi2 < 124.84  # chi-square critical value, 80 degrees of freedom, p = 0.001
    assert abs(flip.double().mean() - 0.5) < 4 * 0.5 / n**0.5
