"""The scripts' common edge (report, curves, evaluate, bench, signals, landscape, plan, gpu-check,
results):
the exit codes train.py has, 0 for a result, 2 for bad input, 1 for an internal error, and one line
instead of a traceback unless --debug is given."""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import traceback
from typing import Callable, Sequence

from idmap import IdmapError, report_failure


def run_command(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """main(argv)'s exit status; `--debug` anywhere in argv shows the traceback too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:  # the traceback, then the same one line and exit code as without --debug
            traceback.print_exc()
        return report_failure(exc, "" if debug else "--debug shows the traceback")


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: a bad flag is bad input like any other, one line and exit code 2
    (run_command), not argparse's usage text."""

    def error(self, message: str):
        raise IdmapError(f"{message} ({self.prog} --help lists the options)")

    def _get_values(self, action, arg_strings):
        # argparse (Python 3.11 at least) drops a value "--" (`--iters=--`) and hands the option an
        # empty list, past its type: a value like any other that is not allowed.
        if arg_strings == ["--"] and action.option_strings:
            self.error(f"argument {'/'.join(action.option_strings)}: '--' is not allowed")
        return super()._get_values(action, arg_strings)


def number(kind: type = float, low: float = 0, strict: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite `kind` (int or float) above `low` (at least `low` unless strict),
    e.g. number(int, 1, strict=False) for a count of at least 1."""
    def parse(text: str):
        try:
            value = kind(text)
            ok = math.isfinite(value) and (value > low if strict else value >= low)
        except (ValueError, OverflowError):
            ok = False
        if not ok:
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; it must be {what} "
                                             f"{'>' if strict else '>='} {low:g}")
        return value

    parse.__name__ = kind.__name__
    return parse


def device(text: str) -> str:
    """An argparse type: a device name as trainer.device takes it (auto, cpu, cuda, cuda:N)."""
    from idmap.train.runtime import DEVICE

    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is no device; use auto, cpu, cuda or cuda:N")
    return text


def figure(text: str):
    """An argparse type: a figure file whose name ends in a format matplotlib writes."""
    from pathlib import Path

    from idmap.rundir import figure_format

    try:
        figure_format(text)
    except IdmapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return Path(text)


def _entry(module: str) -> Callable[..., int]:
    def entry(argv: Sequence[str] | None = None) -> int:
        return run_command(importlib.import_module(module).main, argv)

    entry.__doc__ = f"The {module.rsplit('.', 1)[-1]} command with the scripts' exit codes."
    return entry


# The console commands of pyproject.toml (idmap-report, ...), and scripts/*.py. Named as text: the
# commands' edge may name the measuring code (idmap.perf), which no product module imports.
report, curves = _entry("idmap.analysis.report"), _entry("idmap.analysis.curves")
evaluate = _entry("idmap.train.evaluation")
signals, landscape = _entry("idmap.analysis.signals"), _entry("idmap.analysis.landscape")
results = _entry("idmap.analysis.results_page")
bench, plan, gpu_check = _entry("idmap.perf.bench"), _entry("idmap.perf.plan"), _entry("idmap.perf.gpu_check")
