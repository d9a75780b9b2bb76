#!/usr/bin/env python
"""Write the results page (docs/results.md) from the run files kept in the repository.

    python scripts/results.py docs/results/runs --collect outputs/results   # copy completed runs in
    python scripts/results.py docs/results/runs --out docs/results.md
"""

import sys

from idmap.cli import results as main  # idmap.analysis.results_page's main with the shared exit codes (idmap.cli)

if __name__ == "__main__":
    sys.exit(main())
