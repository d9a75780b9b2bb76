"""The networks: the paper's units built as figure 4's orderings (orderings.py) with figure 2's
shortcuts, at any depth (resnet.py), and their batch norm (norm.py). `idmap.models.build_resnet` is
the interface other tools use."""

from idmap.models.resnet import (DOWNSAMPLES, SHORTCUT_DEFAULTS, SHORTCUTS, UNITS, build_resnet, count_parameters,
                                 model_kwargs)

__all__ = ["build_resnet", "count_parameters", "model_kwargs", "SHORTCUTS", "SHORTCUT_DEFAULTS", "UNITS",
           "DOWNSAMPLES"]
