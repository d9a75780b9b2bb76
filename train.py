"""Train one residual network with the paper's protocol: `python train.py block=full_preact depth=1001`.

Sweeps: `python train.py -m block=original,full_preact seed=1,2,3` or `python train.py +experiment=table2`.
"""

import sys
from pathlib import Path

# Runs from a plain clone too (without `pip install -e .`).
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import hydra  # noqa: E402

from hydra.errors import HydraException  # noqa: E402

from idmap import IdmapError  # noqa: E402
from idmap.config import quote_numeric_choices, register_configs  # noqa: E402
from idmap.resume import resume_argv  # noqa: E402

register_configs()
try:
    sys.argv[1:] = quote_numeric_choices(resume_argv(sys.argv[1:]))
except IdmapError as exc:  # a refused resume: before Hydra writes anything into the run
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
except HydraException as exc:  # e.g. a misspelled key beside trainer.resume=DIR: Hydra's message
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg):
    from idmap.launch import main as launch_main

    return launch_main(cfg)


if __name__ == "__main__":
    main()
