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

from idmap import IdmapError  # noqa: E402
from idmap.config import one_line_message, quote_numeric_choices, register_configs  # noqa: E402
from idmap.launch import before_hydra  # noqa: E402
from idmap.resume import resume_argv  # noqa: E402

register_configs()


def before_hydra_writes(argv: list[str]) -> list[str]:
    """The command line Hydra gets, once the run it names is checked and claimed; bad input ends
    here with one line and exit code 2, before Hydra writes anything."""
    try:
        argv = quote_numeric_choices(resume_argv(argv))
        before_hydra(argv)
        return argv
    except (IdmapError, HydraException) as exc:  # a refused resume, setting or run directory
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {one_line_message(exc)}", file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg):
    from idmap.launch import main as launch_main

    return launch_main(cfg)


if __name__ == "__main__":  # not in the processes a run spawns (they import this file too)
    sys.argv[1:] = before_hydra_writes(sys.argv[1:])
    main()
