"""idmap: every residual unit of 'Identity Mappings in Deep Residual Networks', trained as the paper."""

__version__ = "0.1.0"


class IdmapError(Exception):
    """A problem with the user's input or environment: reported as one line, without a traceback."""
