"""idmap: every residual unit of 'Identity Mappings in Deep Residual Networks', trained as the paper."""

import errno
import sys

__version__ = "0.1.0"

# OS errors that are the user's input or environment, not a bug: a path that does not exist or is a
# file, a folder that cannot be written, a name too long, a full disk.
BAD_PLACE = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
             errno.ENAMETOOLONG, errno.ENOSPC, errno.EDQUOT, errno.EEXIST, errno.ELOOP}


class IdmapError(Exception):
    """A problem with the user's input or environment: reported as one line, without a traceback."""


def one_line(exc: BaseException) -> str:
    """An unexpected exception as one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def one_line_message(exc: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line, without their object dumps."""
    noise = ("full_key:", "reference_type=", "object_type=", "Set the environment variable HYDRA_FULL_ERROR")
    text = str(exc)
    if isinstance(exc, IdmapError):  # one line already (config.compose_checked's), whatever its cause said
        return text
    if exc.__cause__ is not None and str(exc.__cause__) not in text:  # "Error merging override x" says why here
        text += "\n" + str(exc.__cause__)
    lines = [ln.strip() for ln in text.split("Config search path")[0].splitlines()
             if ln.strip() and not ln.strip().startswith(noise)]
    out = []
    for k, line in enumerate(lines):
        if line.startswith("Available options"):  # then one option per line (Hydra may repeat it all)
            options = [o for o in lines[k + 1:] if " " not in o and ":" not in o]
            out.append(f"{line.rstrip(':')}: {', '.join(dict.fromkeys(options))}")
            break
        out.append(line.rstrip("."))
    return "; ".join(out) or type(exc).__name__


def bad_input(exc: BaseException) -> str | None:
    """The one line that reports `exc` as bad input (exit code 2, train.py and every script), or
    None when it is no such thing: a bug (exit code 1)."""
    if isinstance(exc, IdmapError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in BAD_PLACE:
        return (f"{exc.filename}: " if exc.filename else "") + (exc.strerror or str(exc))
    return None


def report_failure(exc: BaseException, more: str = "") -> int:
    """Prints the one line that reports `exc` and returns the exit code every entry point gives it:
    2 for bad input, 1 for an internal error (`more`: where its details are)."""
    line = bad_input(exc)
    if line is not None:
        print(f"error: {line}", file=sys.stderr)
        return 2
    print(f"internal error: {one_line(exc)}" + (f" ({more})" if more else ""), file=sys.stderr)
    return 1
