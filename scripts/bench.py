#!/usr/bin/env python
"""Training throughput: a classic PyTorch loop against this project's trainer at each speed setting
(idmap.perf.bench; `idmap-bench --help`)."""

import sys

from idmap.cli import bench as main  # idmap.perf.bench's main with the shared exit codes (idmap.cli)

if __name__ == "__main__":
    sys.exit(main())
