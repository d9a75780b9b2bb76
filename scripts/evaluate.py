#!/usr/bin/env python
"""Test error, loss, per-class error and confusion matrix of a trained run's checkpoint.

    python scripts/evaluate.py RUN_DIR_OR_CHECKPOINT [dataset=NAME] [dataset.KEY=VALUE ...]
                               [--data IMAGE_FOLDER] [--label LABEL] [--device auto]
                               [--batch-size N] [-o OUTDIR]

Prints the numbers and writes evaluation_<data>.json and confusion_<data>.png beside the checkpoint
(or into OUTDIR). The model is evaluated by the trainer's own evaluation code, on the test split of
the run's data set or of another one with the same classes (dataset=..., --data).
"""

import sys

from idmap.cli import evaluate as main  # idmap.train.evaluation's main with the shared exit codes (idmap.cli)

if __name__ == "__main__":
    sys.exit(main())
