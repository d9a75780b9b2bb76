"""The loss surface around a trained network (Li et al. 2018, "Visualizing the Loss Landscape of
Neural Nets"; docs/paper.md, "Loss landscape"):

    f(alpha, beta) = L(theta* + alpha delta + beta eta)

delta and eta are Gaussian directions with theta*'s shapes, normalised filter by filter,
delta_ij <- delta_ij / ||delta_ij|| * ||theta*_ij|| (i = layer, j = filter, i.e. output unit), so a
step of 1 moves every filter by its own norm: BN makes a net invariant to its filters' scale, and
without this the plot would depend on it. BN parameters and biases (every 1-D parameter) get a zero
direction, as Li et al. do ("ignore BN"). BN runs in eval mode with theta*'s running statistics.
"""

from __future__ import annotations

import datetime
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from idmap import IdmapError, cli
from idmap.train.checkpoint import fits, load_checkpoint, model_from_state
from idmap.train.evaluation import evaluate
from idmap.rundir import check_contained, write_files
from idmap.train.runtime import resolve_device


def filter_normalized_direction(params: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """One random direction for `params` (a model's parameters, in order), drawn on the CPU from
    `generator` so a seed gives the same direction on any device."""
    directions = []
    for p in params:
        if p.dim() <= 1:
            directions.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p)
        scale = p.detach().flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-10)
        directions.append(d * scale.view(-1, *[1] * (p.dim() - 1)))
    return directions


def grid(points: int, extent: float) -> np.ndarray:
    """`points` values over [-extent, extent]; for odd `points` the middle one is exactly 0, so the
    centre of the surface is theta* itself."""
    values = np.linspace(-extent, extent, points)
    if points % 2:
        values[points // 2] = 0.0
    return values


@torch.no_grad()
def loss_surface(model, x, y, directions, alphas, betas, batch: int = 512, progress=None):
    """loss[i, j], accuracy[i, j] = f(alphas[i], betas[j]) as numpy arrays. Parameters are set in
    place on the one model and restored to theta* afterwards; x and y stay on their device."""
    model.eval()
    moved = [(p, p.detach().clone(), d, e) for p, d, e in zip(model.parameters(), *directions) if d.any() or e.any()]
    out = torch.empty(len(alphas), len(betas), 2, device=x.device, dtype=torch.float64)
    try:
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                for p, theta, d, e in moved:
                    p.copy_(theta)
                    if a:  # no arithmetic at all on the zero axes: f(0, 0) is theta*'s loss exactly
                        p.add_(d, alpha=float(a))
                    if b:
                        p.add_(e, alpha=float(b))
                out[i, j] = evaluate(model, x, y, batch).means()
            if progress:
                progress(i + 1, len(alphas))
    finally:
        for p, theta, _, _ in moved:
            p.copy_(theta)
    out = out.cpu().numpy()
    return out[..., 0], 1.0 - out[..., 1]


def training_images(cfg: dict, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of `samples` training images of a run's data set, as the run's model
    read them (train.inputs, the trainer's pipeline), without augmentation; on the CPU."""
    from omegaconf import OmegaConf

    from idmap.train.inputs import Inputs

    return Inputs.of_run(OmegaConf.create(cfg).dataset, torch.device("cpu")).training_subset(samples)


def compute_landscape(path, points: int = 21, extent: float = 1.0, samples: int = 2048, batch: int = 512,
                      seed: int = 0, device: str = "auto", progress=None) -> dict:
    """The surface around the model of a run directory or checkpoint file, with what made it."""
    dev = resolve_device(device)
    state = load_checkpoint(path)
    model = model_from_state(state, path).to(dev).eval()  # one line naming the file if it does not fit
    cfg = state["config"]
    with fits(path):  # what the figures' titles say, from the checkpoint's config
        about = {"depth": cfg["model"]["depth"], "block": cfg["model"]["block"], "shortcut": cfg["shortcut"]["name"],
                 "dataset": cfg["dataset"].get("label") or cfg["dataset"]["name"]}  # e.g. "CIFAR-10 (JPEG copy)"
    x, y = (t.to(dev) for t in training_images(cfg, samples))
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    directions = (filter_normalized_direction(params, gen), filter_normalized_direction(params, gen))
    alphas, betas = grid(points, extent), grid(points, extent)
    start = datetime.datetime.now(datetime.timezone.utc)
    loss, accuracy = loss_surface(model, x, y, directions, alphas, betas, batch, progress)
    meta = {
        "checkpoint": str(path), "iteration": state.get("iteration"), "seed": seed, "samples": len(y),
        "grid": points, "range": extent, "device": str(dev), "torch": torch.__version__,
        "started": start.isoformat(timespec="seconds"),
        "seconds": (datetime.datetime.now(datetime.timezone.utc) - start).total_seconds(),
        **about, "directions": "Li et al. 2018 filter-normalized Gaussian; 1-D parameters (BN, biases) fixed",
        "config": cfg,
    }
    return dict(alphas=alphas, betas=betas, loss=loss, accuracy=accuracy, meta=meta)


# --------------------------------------------------------------------------------------------------
# Files and figures.
# --------------------------------------------------------------------------------------------------
def _title(meta: dict) -> str:
    return (f"{meta['block']} ResNet-{meta['depth']}, {meta['dataset']}, iteration {meta['iteration']}: "
            f"train loss on {meta['samples']} images")


def contour_figure(result: dict, vmax: float = 10.0):
    """Li et al.'s 2-D contour plot; levels stop at `vmax` (their default 10) so the basin shows."""
    from matplotlib.figure import Figure

    a, b, z = result["alphas"], result["betas"], np.nan_to_num(result["loss"].T, nan=np.inf)
    top = min(float(np.max(z)), vmax)
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.subplots()
    cs = ax.contour(a, b, z, levels=np.linspace(float(np.min(z)), top, 25), cmap="viridis")
    ax.clabel(cs, cs.levels[::4], fontsize=7, fmt="%.2g")
    ax.plot([0], [0], "r+", markersize=10)
    ax.set(xlabel=r"$\alpha$ (direction $\delta$)", ylabel=r"$\beta$ (direction $\eta$)", aspect="equal")
    ax.set_title(_title(result["meta"]), fontsize=9)
    return fig


def surface_figure(result: dict, vmax: float = 10.0):
    from matplotlib.figure import Figure

    A, B = np.meshgrid(result["alphas"], result["betas"])
    z = np.clip(np.nan_to_num(result["loss"].T, nan=vmax), None, vmax)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(A, B, z, cmap="viridis", linewidth=0, antialiased=True)
    ax.set(xlabel=r"$\alpha$", ylabel=r"$\beta$", zlabel=f"loss (clipped at {vmax:g})")
    ax.set_title(_title(result["meta"]), fontsize=9)
    return fig


def write_landscape(result: dict, outdir: str | Path, vmax: float = 10.0) -> list[Path]:
    """landscape.npz (alphas, betas, loss[i, j] = f(alphas[i], betas[j]), accuracy, meta as JSON),
    landscape.csv and the two figures, written as one set: a failure in any leaves an earlier
    landscape whole, not half replaced."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: result[k] for k in ("alphas", "betas", "loss", "accuracy")}
    buf = io.BytesIO()  # np.savez wants a seekable file; the bytes then go in with one atomic write
    np.savez(buf, **arrays, meta=np.array(json.dumps(result["meta"], default=str)))
    loss, acc = result["loss"].tolist(), result["accuracy"].tolist()  # Python floats: repr round-trips
    rows = [f"{a!r},{b!r},{loss[i][j]!r},{acc[i][j]!r}"
            for i, a in enumerate(result["alphas"].tolist()) for j, b in enumerate(result["betas"].tolist())]
    csv = ("\n".join(["alpha,beta,loss,accuracy", *rows]) + "\n").encode()
    figures = contour_figure(result, vmax), surface_figure(result, vmax)
    paths = [out / n for n in ("landscape.npz", "landscape.csv", "landscape_contour.png", "landscape_surface.png")]
    write_files({paths[0]: lambda f: f.write(buf.getvalue()), paths[1]: lambda f: f.write(csv),
                 paths[2]: lambda f: figures[0].savefig(f, format="png", dpi=120),
                 paths[3]: lambda f: figures[1].savefig(f, format="png", dpi=120)})
    return paths


def read_landscape(path: str | Path) -> dict:
    with np.load(path) as z:
        result = {k: z[k] for k in ("alphas", "betas", "loss", "accuracy")}
        result["meta"] = json.loads(str(z["meta"]))
    return result


def main(argv=None) -> int:
    """`scripts/landscape.py` / `idmap-landscape`."""
    count = cli.number(int, 1, strict=False)
    p = cli.ArgumentParser(description="Loss landscape around a trained run (Li et al. 2018).")
    p.add_argument("path", type=Path, help="run directory or checkpoint file")
    p.add_argument("--grid", type=cli.number(int, 2, strict=False), default=21,
                   help="points per axis, at least 2 (odd: the centre is theta* itself)")
    p.add_argument("--range", type=cli.number(), default=1.0, dest="extent", help="alpha, beta in [-range, range]")
    p.add_argument("--samples", type=count, default=2048, help="a fixed random subset of N training images")
    p.add_argument("--batch", type=count, default=512)
    p.add_argument("--seed", type=cli.number(int, 0, strict=False), default=0, help="seed of the two random directions")
    p.add_argument("--device", default="auto", type=cli.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--vmax", type=cli.number(), default=10.0, help="loss at which the plots stop (Li et al.: 10)")
    p.add_argument("-o", "--out", type=Path, help="output folder (default: RUN_DIR/landscape)")
    args = p.parse_args(argv)
    out = args.out
    if out is None:  # inside the run: a link there that leads out of it is not written through
        run_dir = args.path if args.path.is_dir() else args.path.parent
        check_contained(run_dir)
        out = run_dir / "landscape"

    def progress(done, total):
        print(f"\rrow {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    try:
        result = compute_landscape(args.path, args.grid, args.extent, args.samples, args.batch,
                                   args.seed, args.device, progress)
        paths = write_landscape(result, out, args.vmax)
    except IdmapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    c = args.grid // 2
    centre = f"f(0, 0) = {result['loss'][c, c]:.4f}, " if args.grid % 2 else ""
    meta = result["meta"]
    print(f"{centre}min {result['loss'].min():.4f}, max {result['loss'].max():.4f} "
          f"({meta['seconds']:.0f} s on {meta['device']})")
    for path in paths:
        print(path)
    return 0
