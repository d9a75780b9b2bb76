#!/usr/bin/env python
"""What a sweep will cost before it runs: its jobs as Hydra expands them, each distinct model timed
with the trainer's own step (idmap.perf.plan; `python scripts/plan.py --help`).

    python scripts/plan.py +experiment=table2
    python scripts/plan.py block=original,full_preact seed=1,2,3 --json
"""

import sys
from pathlib import Path

# Runs from a plain clone too (without `pip install -e .`), as train.py does.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from idmap.cli import plan as main  # noqa: E402  idmap.perf.plan's main with the shared exit codes

if __name__ == "__main__":
    sys.exit(main())
