#!/usr/bin/env python
"""The loss surface around a trained run (Li et al. 2018; paper.md, "Loss landscape").

    python scripts/landscape.py RUN_DIR_OR_CHECKPOINT [--grid 21] [--range 1.0] [--samples 2048]
                                [--batch 512] [--seed 0] [--device auto] [-o OUTDIR]

Writes landscape.npz, landscape.csv, landscape_contour.png and landscape_surface.png into OUTDIR
(default: RUN_DIR/landscape/). grid x grid forward passes over the samples: use a GPU for deep nets.
"""

import argparse
import sys
from pathlib import Path

from idmap import IdmapError
from idmap.landscape import compute_landscape, write_landscape


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="run directory or checkpoint file")
    p.add_argument("--grid", type=int, default=21, help="points per axis (odd: the centre is theta* itself)")
    p.add_argument("--range", type=float, default=1.0, dest="extent", help="alpha, beta in [-range, range]")
    p.add_argument("--samples", type=int, default=2048, help="a fixed random subset of N training images")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="seed of the two random directions")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--vmax", type=float, default=10.0, help="loss at which the plots stop (Li et al.: 10)")
    p.add_argument("-o", "--out", type=Path, help="output folder (default: RUN_DIR/landscape)")
    args = p.parse_args(argv)
    if args.grid < 2:
        p.error("--grid must be at least 2")
    out = args.out or (args.path if args.path.is_dir() else args.path.parent) / "landscape"

    def progress(done, total):
        print(f"\rrow {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    try:
        result = compute_landscape(args.path, args.grid, args.extent, args.samples, args.batch,
                                   args.seed, args.device, progress)
        paths = write_landscape(result, out, args.vmax)
    except IdmapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    c = args.grid // 2
    centre = f"f(0, 0) = {result['loss'][c, c]:.4f}, " if args.grid % 2 else ""
    meta = result["meta"]
    print(f"{centre}min {result['loss'].min():.4f}, max {result['loss'].max():.4f} "
          f"({meta['seconds']:.0f} s on {meta['device']})")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
