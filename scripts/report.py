#!/usr/bin/env python
"""Print the paper's tables with the reproduced test errors of the runs under DIR...

    python scripts/report.py outputs/multirun [--table table1|table2|table3|resnet20_ablation|auto]
                             [--csv table.csv]
"""

import sys

from idmap.cli import report as main  # idmap.report's main with the shared exit codes (idmap.cli)

if __name__ == "__main__":
    sys.exit(main())
