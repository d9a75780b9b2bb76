"""How far signals travel through the stack of residual units (paper, eqs. 4 and 5).

With identity shortcuts and no after-addition activation,

    x_L = x_l + sum_{i=l}^{L-1} F(x_i)                                   (4)
    dE/dx_l = dE/dx_L (1 + d/dx_l sum_{i=l}^{L-1} F(x_i))                 (5)

so the input of any unit reaches any deeper unit, and the gradient at any deeper unit reaches any
shallower one, unchanged by the units in between. `unit_signals` measures both per unit: with a
zeroed branch a full pre-activation unit passes them on exactly; the original unit's
after-addition ReLU and the BN in its branch do not.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from idmap import IdmapError, cli


def _mean_norms(ts) -> list[float]:
    """Mean per-sample L2 norm of each tensor, read back in one host sync."""
    return torch.stack([t.detach().float().flatten(1).norm(dim=1).mean() for t in ts]).tolist()


def unit_signals(model, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-unit activation and gradient norms of one batch, indexed l = 0..L for a net of L units.

    x_l is unit l's input (x_0 is conv1's output) and x_L the last unit's output, i.e. what the
    head (the extra BN-ReLU, pooling, fc) reads. For each l:
      activation_norm[l]: mean over the batch of ||x_l||_2, each sample's x_l flattened;
      gradient_norm[l]: the same for dE/dx_l, E the *summed* cross-entropy of the batch, so each
        sample's gradient is that of its own loss (exactly so in eval mode) and does not shrink
        with the batch size.
    Also returns `loss` (mean cross-entropy) and `stage_starts`, the units whose output has
    another shape than their input (dimension-increasing units).

    The model's mode is the caller's: train mode normalises with batch statistics as in training,
    eval mode with the running ones. Parameters' .grad and BN running statistics are left as they
    were. Pass the plain module (not a torch.compile or DDP wrapper) so the hooks see its units.
    """
    inputs: dict[int, torch.Tensor] = {}

    def keep(index):
        return lambda module, args: inputs.setdefault(index, args[0])

    points = list(model.units) + [model.head_act]
    hooks = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(points)]
    buffers = [b.detach().clone() for b in model.buffers()]
    try:
        # An input that requires grad makes every x_l part of the graph, even with frozen weights.
        logits = model(x.detach().requires_grad_(True))
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        # Taken before the backward pass, in which activation checkpointing runs units again.
        xs = [inputs[i] for i in range(len(points))]
        # autograd.grad, not backward(): only dE/dx_l is computed; no parameter's .grad is touched.
        grads = torch.autograd.grad(loss, xs)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():  # one signal batch must not move BN's running statistics
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
    return {
        "activation_norm": _mean_norms(xs),
        "gradient_norm": _mean_norms(grads),
        "loss": loss.item() / len(y),
        "stage_starts": [l for l in range(len(xs) - 1) if xs[l].shape != xs[l + 1].shape],
    }


def plot_signals(axes, signals: dict, label: str, **line) -> None:
    """One line per quantity on two axes (activation norm, gradient norm) against unit index; a dot
    marks the input of each dimension-increasing unit."""
    for ax, key, title in zip(axes, ("activation_norm", "gradient_norm"),
                              (r"activation $\|x_l\|$", r"gradient $\|\partial E/\partial x_l\|$")):
        ax.plot(signals[key], label=label, marker="o", markersize=3, markevery=signals["stage_starts"], **line)
        ax.set_yscale("log")
        ax.set_xlabel("unit l (x_L = last unit's output)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)


def signal_figure(runs: list[tuple], title: str = ""):
    """The two panels of `plot_signals` for several models as a matplotlib Figure; each run is
    (label, signals) or (label, signals, line style keywords)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing kept alive globally

    ncols = min(3, len(runs))
    fig = Figure(figsize=(11, 4.2 + 0.25 * -(-len(runs) // ncols)), layout="constrained")
    axes = fig.subplots(1, 2)
    for label, signals, *style in runs:
        plot_signals(axes, signals, label, **(style[0] if style else {}))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=ncols, fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def log_signals(writer, model, x: torch.Tensor, y: torch.Tensor, step: int, figure: bool = True) -> dict:
    """Writes a few summary scalars of `unit_signals` (and its two-panel plot) to TensorBoard.

    signal/grad_ratio: ||dE/dx_0|| / ||dE/dx_L||, the gradient reaching the first unit relative to
    the last (eq. 5: about 1 with clean shortcuts); signal/grad_min, grad_max over units;
    signal/act_ratio: ||x_L|| / ||x_0||. The full per-unit curves go in as one figure rather than
    hundreds of scalar tags (ResNet-1001 has 333 units).
    """
    s = unit_signals(model, x, y)
    g, a = s["gradient_norm"], s["activation_norm"]
    scalars = {
        "grad_ratio": g[0] / g[-1] if g[-1] else float("inf"),
        "grad_min": min(g),
        "grad_max": max(g),
        "grad_first": g[0],
        "grad_last": g[-1],
        "act_ratio": a[-1] / a[0] if a[0] else float("inf"),
    }
    for name, value in scalars.items():
        writer.add_scalar(f"signal/{name}", value, step)
    if figure:
        writer.add_figure("signal/per_unit", signal_figure([(f"step {step}", s)]), step)
    return s


# --------------------------------------------------------------------------------------------------
# The command line: scripts/signals.py
# --------------------------------------------------------------------------------------------------
STYLES = ("-", "--", ":", "-.")


def run_batch(cfg: dict, n: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from idmap.analysis.landscape import training_images

        return training_images(cfg, n)
    except (ImportError, IdmapError) as exc:  # no data module or no data: say so, use noise
        print(f"  its data set is unavailable ({exc}); using random images", file=sys.stderr)
        return random_batch(n, classes, 0)


def random_batch(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def main(argv=None) -> int:
    """`scripts/signals.py` / `idmap-signals`: the figure for untrained nets and trained runs."""
    from idmap.train.checkpoint import load_model
    from idmap.models.resnet import ORDERINGS, build_resnet
    from idmap.rundir import write_figure
    from idmap.train.runtime import resolve_device

    count = cli.number(int, 1, strict=False)
    p = cli.ArgumentParser(description="Activation and gradient norms per residual unit, several nets side by side (eqs. 4-5).")
    p.add_argument("--blocks", nargs="*", default=[], choices=list(ORDERINGS), metavar="BLOCK",
                   help=f"untrained nets of these orderings: {', '.join(ORDERINGS)}")
    p.add_argument("--depths", nargs="*", type=count, default=[164, 1001])
    p.add_argument("--zero-init", action="store_true", help="untrained nets with zeroed branches")
    p.add_argument("--runs", nargs="*", type=Path, default=[], help="trained run directories or checkpoints")
    p.add_argument("--batch", type=count, help="images per net (default 64; 16 for nets over 500 layers)")
    p.add_argument("--mode", choices=("train", "eval"), default="train",
                   help="BN statistics of the batch (train) or running ones (eval)")
    p.add_argument("--seed", type=cli.number(int, 0, strict=False), default=0,
                   help="seed of the init and of the random images")
    p.add_argument("--device", default="cpu", type=cli.device, help="cpu | cuda | cuda:N")
    p.add_argument("--title", default="")
    p.add_argument("-o", "--out", type=cli.figure, required=True, help="figure file (.png, .pdf, .svg, ...)")
    args = p.parse_args(argv)
    if not args.blocks and not args.runs:
        p.error("give --blocks (untrained nets) and/or --runs")
    dev = resolve_device(args.device)

    def batch_for(depth: int) -> int:
        return args.batch or (16 if depth > 500 else 64)

    def untrained(depth: int, block: str):
        try:
            model = build_resnet(depth, block=block, zero_init_residual=args.zero_init)
        except ValueError as exc:  # an impossible depth: bad input
            raise IdmapError(f"--depths {depth}: {exc}") from exc
        return (model, *random_batch(batch_for(depth), model.fc.out_features, args.seed))

    def trained(run: Path):
        model, cfg = load_model(run)
        return (model, *run_batch(cfg, batch_for(model.arch["depth"]), model.fc.out_features))

    init = "zeroed branches" if args.zero_init else "init"
    # Colour by ordering, line style by depth; nets are built one at a time (ResNet-1001 is large).
    nets = [(f"{block} ResNet-{depth} ({init})",
             dict(color=f"C{list(ORDERINGS).index(block)}", linestyle=STYLES[i % len(STYLES)]),
             partial(untrained, depth, block))
            for i, depth in enumerate(args.depths) for block in args.blocks]
    nets += [(run.name if run.is_dir() else f"{run.parent.name}/{run.name}", {}, partial(trained, run))
             for run in args.runs]

    lines = []
    try:
        for label, style, make in nets:
            start = time.perf_counter()
            torch.manual_seed(args.seed)
            model, x, y = make()
            model.to(dev).train(args.mode == "train")
            s = unit_signals(model, x.to(dev), y.to(dev))
            g = s["gradient_norm"]
            print(f"{label}: {len(g) - 1} units, batch {len(y)}, |dE/dx_0| / |dE/dx_L| = {g[0] / g[-1]:.3g} "
                  f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
            lines.append((label, s, style))
            del model
    except IdmapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stats = "batch" if args.mode == "train" else "running"
    inputs = ", random N(0,1) inputs" if args.blocks else ""
    title = args.title or (f"BN on {stats} statistics ({args.mode} mode){inputs}; "
                           f"dots: inputs of dimension-increasing units")
    write_figure(signal_figure(lines, title), args.out, dpi=110)
    print(args.out)
    return 0
