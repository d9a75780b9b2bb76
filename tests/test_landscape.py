"""The loss-landscape figure of Li et al. 2018 (docs/paper.md, "Loss landscape"), on a tiny run."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from idmap.train.checkpoint import load_model, save_checkpoint
from idmap.models.resnet import model_kwargs
from idmap.config import Config
from idmap.train.data import load_dataset, normalization, normalize
from idmap.analysis.landscape import filter_normalized_direction, grid, loss_surface
from idmap.models.resnet import build_resnet

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 96


def tiny_config() -> dict:
    cfg = OmegaConf.structured(Config)
    cfg.dataset.name, cfg.dataset.num_train, cfg.dataset.num_test, cfg.dataset.image_size = "synthetic", 128, 32, 16
    cfg.model.depth, cfg.model.widths, cfg.model.block = 8, [4, 8, 16], "full_preact"
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A checkpoint as the trainer writes it, after a few SGD steps (BN running statistics moved)."""
    cfg = tiny_config()
    data = load_dataset(OmegaConf.create(cfg).dataset)
    mean, std = normalization(data.train_x, "channel")
    torch.manual_seed(0)
    model = build_resnet(**model_kwargs(cfg, data.num_classes)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(0, 128, 32):
        loss = F.cross_entropy(model(normalize(data.train_x[i:i + 32], mean, std)), data.train_y[i:i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "checkpoint.pt", {"model": model.state_dict(), "config": cfg,
                                            "num_classes": data.num_classes, "iteration": 4})
    return run


@pytest.fixture(scope="module")
def landscape(run_dir):
    """scripts/landscape.py run as a user would, on a 5x5 grid (batch 40: chunks of unequal size)."""
    spec = importlib.util.spec_from_file_location("landscape_script", ROOT / "scripts" / "landscape.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [str(run_dir), "--grid", "5", "--samples", str(SAMPLES), "--batch", "40", "--device", "cpu"]
    assert script.main(argv) == 0
    return run_dir / "landscape"


def test_the_grid_centre_is_exactly_zero_and_the_ends_are_the_range():
    for points in (3, 5, 21, 51, 101):
        for extent in (1.0, 0.3, 0.7, 2.5):
            g = grid(points, extent)
            assert g[points // 2] == 0.0 and g[0] == -extent and g[-1] == extent


def test_the_centre_of_the_surface_is_the_checkpoints_own_loss(run_dir, landscape):
    model, cfg = load_model(run_dir)
    data = load_dataset(OmegaConf.create(cfg).dataset)
    # The surface is computed on a fixed random subset (seed 0) of the training images.
    pick = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))[:SAMPLES]
    x = normalize(data.train_x[pick], *normalization(data.train_x, cfg["dataset"]["normalization"]))
    with torch.no_grad():
        direct = F.cross_entropy(model.eval()(x), data.train_y[pick]).item()
    with np.load(landscape / "landscape.npz") as z:
        loss, alphas, betas = z["loss"], z["alphas"], z["betas"]
    assert alphas[2] == betas[2] == 0.0
    assert loss[2, 2] == pytest.approx(direct, rel=1e-6)
    assert loss.min() >= 0 and loss[[0, 0, -1, -1], [0, -1, 0, -1]].min() > loss[2, 2]  # a basin, not flat


def test_directions_are_filter_normalized_and_ignore_bn_and_biases():
    torch.manual_seed(0)
    model = build_resnet(8, widths=[4, 8, 16], block="original", shortcut="exclusive_gating")  # gates: conv biases
    params = list(model.parameters())
    d = filter_normalized_direction(params, torch.Generator().manual_seed(3))
    e = filter_normalized_direction(params, torch.Generator().manual_seed(3))
    f = filter_normalized_direction(params, torch.Generator().manual_seed(4))
    assert any(p.dim() == 1 for p in params) and any(p.dim() == 2 for p in params)  # BN, biases, fc
    for p, dp, ep, fp in zip(params, d, e, f):
        assert dp.shape == p.shape and torch.equal(dp, ep)  # a seed is a direction
        if p.dim() == 1:
            assert not dp.any()
        else:
            torch.testing.assert_close(dp.flatten(1).norm(dim=1), p.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)
            assert not torch.allclose(dp, fp)


def test_the_model_is_theta_star_again_afterwards():
    torch.manual_seed(0)
    model = build_resnet(8, widths=[4, 8, 16])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    dirs = [filter_normalized_direction(list(model.parameters()), gen) for _ in range(2)]
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    loss, acc = loss_surface(model, x, y, dirs, grid(3, 1), grid(3, 0.5))
    assert loss.shape == acc.shape == (3, 3) and len(np.unique(loss)) == 9
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # loss[i, j] is f(alphas[i], betas[j]) = L(theta* + alpha delta + beta eta), here alpha=-1, beta=0.5
    with torch.no_grad():
        for p, d, e in zip(model.parameters(), *dirs):
            p.add_(-1.0 * d + 0.5 * e)
        assert loss[0, 2] == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)


def test_the_files_are_the_grid_and_readable_pngs(landscape):
    import matplotlib.image

    with np.load(landscape / "landscape.npz") as z:
        loss, meta = z["loss"], json.loads(str(z["meta"]))
    assert meta["samples"] == SAMPLES and meta["grid"] == 5 and meta["iteration"] == 4
    rows = (landscape / "landscape.csv").read_text().splitlines()
    assert rows[0] == "alpha,beta,loss,accuracy" and len(rows) == 1 + 25
    assert float(rows[1 + 2 * 5 + 2].split(",")[2]) == loss[2, 2]  # row of alpha = beta = 0
    for name in ("landscape_contour.png", "landscape_surface.png"):
        path = landscape / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 300 and image.std() > 0


def test_the_fixed_subset_is_random_not_the_first_images_of_a_class_sorted_folder(run_dir, monkeypatch):
    import dataclasses

    import idmap.train.data
    from idmap.analysis.landscape import training_images

    real = idmap.train.data.load_dataset

    def class_sorted(ds_cfg):  # as an image folder lists its images: class by class
        d = real(ds_cfg)
        order = torch.argsort(d.train_y, stable=True)
        return dataclasses.replace(d, train_x=d.train_x[order], train_y=d.train_y[order])

    monkeypatch.setattr(idmap.train.data, "load_dataset", class_sorted)
    _, cfg = load_model(run_dir)
    x, y = training_images(cfg, 64)
    x2, y2 = training_images(cfg, 64)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # fixed
    assert len(y.unique()) == cfg["dataset"]["num_classes"]  # the first 64 would be one class
