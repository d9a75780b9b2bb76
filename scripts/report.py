#!/usr/bin/env python
"""Print the paper's tables with the reproduced test errors of the runs under DIR..., and a table of
one line per setting for the runs of any other sweep.

    python scripts/report.py outputs/multirun [--table table1|table2|table3|resnet20_ablation|sweep|auto]
                             [--csv table.csv] [--baseline KEY|KEY=VALUE] [--by KEY,...]
                             [--seeds-needed] [--next]
"""

import sys

from idmap.cli import report as main  # idmap.analysis.report's main with the shared exit codes (idmap.cli)

if __name__ == "__main__":
    sys.exit(main())
