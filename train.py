"""Train one residual network with the paper's protocol: `python train.py block=full_preact depth=1001`.

Sweeps: `python train.py -m block=original,full_preact seed=1,2,3` or `python train.py +experiment=table2`.
"""

import os
import sys
from pathlib import Path

# Runs from a plain clone too (without `pip install -e .`).
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import hydra  # noqa: E402

from hydra.errors import HydraException  # noqa: E402

from idmap import IdmapError, bad_input, one_line_message, report_failure  # noqa: E402
from idmap.config import quote_numeric_choices, register_configs  # noqa: E402
from idmap.overrides import check_overrides  # noqa: E402
from idmap.run.launch import before_hydra  # noqa: E402
from idmap.run.resume import resume_argv  # noqa: E402

register_configs()


def before_hydra_writes(argv: list[str]) -> list[str]:
    """The command line Hydra gets, once the files it names are checked (no path for an option,
    unit files only on the search path, a run's record replaying only this project's settings)
    and the run it names is checked and claimed; bad input ends here with one line and exit code 2,
    before Hydra reads a file for it or writes anything."""
    try:
        check_overrides(argv)
        return before_hydra(quote_numeric_choices(resume_argv(argv)))
    except Exception as exc:  # a refused resume, setting, file or run directory
        if isinstance(exc, HydraException):  # Hydra's message, as one line of bad input
            exc = IdmapError(one_line_message(exc))
        if bad_input(exc) is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # a bug here: Python's traceback
        sys.exit(report_failure(exc))


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg):
    from idmap.run.launch import main as launch_main

    return launch_main(cfg)


if __name__ == "__main__":  # not in the processes a run spawns (they import this file too)
    sys.argv[1:] = before_hydra_writes(sys.argv[1:])
    main()
