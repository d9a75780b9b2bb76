#!/usr/bin/env python
"""Activation and gradient norms per residual unit, several nets side by side (paper, eqs. 4-5).

    python scripts/signals.py --blocks original full_preact --depths 164 1001 -o signal_init.png
    python scripts/signals.py --runs RUN_DIR [RUN_DIR ...] -o signal_trained.png

Untrained nets (--blocks x --depths, He init; --zero-init zeroes every branch's last layer) read a
batch of standard-normal 3x32x32 images; runs read a fixed random subset of their own training set.
"""

import sys

from idmap.cli import signals as main  # idmap.analysis.signals' main with the shared exit codes (idmap.cli)

if __name__ == "__main__":
    sys.exit(main())
