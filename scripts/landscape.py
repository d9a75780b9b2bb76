#!/usr/bin/env python
"""The loss surface around a trained run (Li et al. 2018; docs/paper.md, "Loss landscape").

    python scripts/landscape.py RUN_DIR_OR_CHECKPOINT [--grid 21] [--range 1.0] [--samples 2048]
                                [--batch 512] [--seed 0] [--device auto] [-o OUTDIR]

Writes landscape.npz, landscape.csv, landscape_contour.png and landscape_surface.png into OUTDIR
(default: RUN_DIR/landscape/). grid x grid forward passes over the samples: use a GPU for deep nets.
"""

import sys

from idmap.cli import landscape as main  # idmap.analysis.landscape's main with the shared exit codes (idmap.cli)

if __name__ == "__main__":
    sys.exit(main())
