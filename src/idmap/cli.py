"""The scripts' common edge (report, curves, evaluate, bench, signals, landscape, plan, gpu-check):
the exit codes train.py has, 0 for a result, 2 for bad input, 1 for an internal error, and one line
instead of a traceback unless --debug is given."""

from __future__ import annotations

import errno
import importlib
import sys
from typing import Callable, Sequence

from idmap import IdmapError, one_line

# OS errors that are the user's input or environment: a path that does not exist or is a file, a
# folder that cannot be written, a name too long, a full disk.
_BAD_PLACE = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
              errno.ENAMETOOLONG, errno.ENOSPC, errno.EDQUOT, errno.EEXIST}


def run_command(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """main(argv)'s exit status; `--debug` anywhere in argv shows tracebacks instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, IdmapError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError) and exc.errno in _BAD_PLACE:
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"internal error: {one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 1


def _entry(module: str) -> Callable[..., int]:
    def entry(argv: Sequence[str] | None = None) -> int:
        return run_command(importlib.import_module(module).main, argv)

    entry.__doc__ = f"The {module.rsplit('.', 1)[1]} command with the scripts' exit codes."
    return entry


# The console commands of pyproject.toml (idmap-report, ...), and scripts/*.py.
report, curves, evaluate = _entry("idmap.report"), _entry("idmap.curves"), _entry("idmap.evaluation")
bench, signals, landscape = _entry("idmap.bench"), _entry("idmap.signals"), _entry("idmap.landscape")
plan, gpu_check = _entry("idmap.plan"), _entry("idmap.gpu_check")
results = _entry("idmap.results")
