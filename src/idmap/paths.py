"""Where the files the code reads live, in one place: the config groups (conf/) and the clone.

conf/ stays at the top of the clone, the project's layout; the wheel carries a copy as idmap/conf
(setup.py), so that an installed idmap composes the same configs from any folder. Code running
from a clone (train.py, PYTHONPATH=src, an editable install) reads the clone's conf/, so an edit
there counts without reinstalling.
"""

from __future__ import annotations

from pathlib import Path

from idmap import IdmapError

PACKAGE = Path(__file__).resolve().parent
_TOP = PACKAGE.parents[1]
# The clone this code runs from (src/idmap beside conf/), or None for an installed copy.
REPO = _TOP if PACKAGE.parent.name == "src" and (_TOP / "conf" / "train.yaml").is_file() else None
CONF = REPO / "conf" if REPO else PACKAGE / "conf"


def repo(what: str) -> Path:
    """The clone, for `what` that runs the clone's own files (train.py, scripts/, tests/)."""
    if REPO is None:
        raise IdmapError(f"{what} runs the clone's train.py, scripts and tests, and this idmap is an "
                         f"installed copy ({PACKAGE}): run it in a clone of the project (make setup)")
    return REPO
