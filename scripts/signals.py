#!/usr/bin/env python
"""Activation and gradient norms per residual unit, several nets side by side (paper, eqs. 4-5).

    python scripts/signals.py --blocks original full_preact --depths 164 1001 -o signal_init.png
    python scripts/signals.py --runs RUN_DIR [RUN_DIR ...] -o signal_trained.png

Untrained nets (--blocks x --depths, He init; --zero-init zeroes every branch's last layer) read a
batch of standard-normal 3x32x32 images; runs read a fixed random subset of their own training set.
"""

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

from idmap import IdmapError
from idmap.checkpoint import atomic_write, load_model
from idmap.models import ORDERINGS, build_resnet
from idmap.signal import signal_figure, unit_signals

STYLES = ("-", "--", ":", "-.")


def run_batch(cfg: dict, n: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from idmap.landscape import training_images

        return training_images(cfg, n)
    except (ImportError, IdmapError) as exc:  # no data module or no data: say so, use noise
        print(f"  its data set is unavailable ({exc}); using random images", file=sys.stderr)
        return random_batch(n, classes, 0)


def random_batch(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", nargs="*", default=[], choices=list(ORDERINGS), metavar="BLOCK",
                   help=f"untrained nets of these orderings: {', '.join(ORDERINGS)}")
    p.add_argument("--depths", nargs="*", type=int, default=[164, 1001])
    p.add_argument("--zero-init", action="store_true", help="untrained nets with zeroed branches")
    p.add_argument("--runs", nargs="*", type=Path, default=[], help="trained run directories or checkpoints")
    p.add_argument("--batch", type=int, help="images per net (default 64; 16 for nets over 500 layers)")
    p.add_argument("--mode", choices=("train", "eval"), default="train",
                   help="BN statistics of the batch (train) or running ones (eval)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and of the random images")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--title", default="")
    p.add_argument("-o", "--out", type=Path, required=True, help="PNG file")
    args = p.parse_args(argv)
    if not args.blocks and not args.runs:
        p.error("give --blocks (untrained nets) and/or --runs")
    dev = torch.device(args.device)

    def batch_for(depth: int) -> int:
        return args.batch or (16 if depth > 500 else 64)

    def untrained(depth: int, block: str):
        model = build_resnet(depth, block=block, zero_init_residual=args.zero_init)
        return (model, *random_batch(batch_for(depth), model.fc.out_features, args.seed))

    def trained(run: Path):
        model, cfg = load_model(run)
        return (model, *run_batch(cfg, batch_for(cfg["model"]["depth"]), model.fc.out_features))

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
        return 1
    stats = "batch" if args.mode == "train" else "running"
    inputs = ", random N(0,1) inputs" if args.blocks else ""
    title = args.title or (f"BN on {stats} statistics ({args.mode} mode){inputs}; "
                           f"dots: inputs of dimension-increasing units")
    fig = signal_figure(lines, title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda f: fig.savefig(f, format="png", dpi=110))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
