"""idmap: every residual unit of 'Identity Mappings in Deep Residual Networks', trained as the paper."""

__version__ = "0.1.0"


class IdmapError(Exception):
    """A problem with the user's input or environment: reported as one line, without a traceback."""


def one_line(exc: BaseException) -> str:
    """An unexpected exception as one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
