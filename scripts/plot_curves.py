#!/usr/bin/env python
"""Training curves as in the paper's figures 1 and 6 (idmap.analysis.curves), from the runs under DIR...

    python scripts/plot_curves.py outputs/multirun/2026-01-01/12-00-00 -o curves.png
    python scripts/plot_curves.py outputs/multirun --table table2 -o table2.png
"""

import sys

from idmap.cli import curves as main  # idmap.analysis.curves' main with the shared exit codes (idmap.cli)

if __name__ == "__main__":
    sys.exit(main())
