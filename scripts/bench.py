#!/usr/bin/env python
"""Training throughput: a classic PyTorch loop against this project's trainer at each speed setting
(idmap.bench; `idmap-bench --help`)."""

import sys

from idmap.bench import main

if __name__ == "__main__":
    sys.exit(main())
