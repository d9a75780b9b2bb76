#!/usr/bin/env python
"""Every question a GPU window must answer, in one call: machine, tests, smoke, resume, bench, packing,
fused, fidelity, long runs (idmap.perf.gpu_check; `idmap-gpu-check --help`, docs/benchmarks.md)."""

import sys

from idmap.cli import gpu_check as main  # idmap.perf.gpu_check's main with the shared exit codes (idmap.cli)

if __name__ == "__main__":
    sys.exit(main())
