"""Figure 4: where BN and ReLU go in a residual unit, as data. The one place the paper's five
orderings are defined; conf/block/<name>.yaml names one of them, or gives a new one as data.

`layer` wraps every weight layer of the branch but the last, `last` wraps the last one, `after_add`
is f, applied after the addition. Read a basic (two-layer) unit as layer + last:
  (a) original          conv bn relu | conv bn        | add | relu
  (b) bn_after_add      conv bn relu | conv           | add | bn relu
  (c) relu_before_add   conv bn relu | conv bn relu   | add
  (d) relu_only_preact  relu conv bn | relu conv bn   | add
  (e) full_preact       bn relu conv | bn relu conv   | add

A unit of one's own is a block file with the same three pieces (hydra.searchpath=[file://DIR] with
DIR/block/<name>.yaml); its name is the file's, as run folders, summaries and reports call it:

    # @package model
    block: bn_relu_conv_bn        # the file's name
    ordering:
      layer: [bn, relu, conv]
      last: [bn, relu, conv, bn]
      after_add: []
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from idmap import IdmapError

OPS = ("bn", "relu", "conv")
PIECES = ("layer", "last", "after_add")


@dataclass(frozen=True)
class Ordering:
    layer: tuple[str, ...]
    last: tuple[str, ...]
    after_add: tuple[str, ...] = ()
    name: str = field(default="", compare=False)  # what summaries and reports call the unit

    @property
    def preact(self) -> tuple[str, ...]:
        """The activation a pre-activation unit applies before its first weight layer."""
        return self.layer[: self.layer.index("conv")]


ORDERINGS = {
    "original": Ordering(("conv", "bn", "relu"), ("conv", "bn"), ("relu",), "original"),
    "bn_after_add": Ordering(("conv", "bn", "relu"), ("conv",), ("bn", "relu"), "bn_after_add"),
    "relu_before_add": Ordering(("conv", "bn", "relu"), ("conv", "bn", "relu"), (), "relu_before_add"),
    "relu_only_preact": Ordering(("relu", "conv", "bn"), ("relu", "conv", "bn"), (), "relu_only_preact"),
    "full_preact": Ordering(("bn", "relu", "conv"), ("bn", "relu", "conv"), (), "full_preact"),
}


def _piece(data: Mapping, key: str, where: str) -> tuple[str, ...]:
    ops = data.get(key, [] if key == "after_add" else None)
    if ops is None:
        raise ValueError(f"{where}: ordering.{key} is missing; give it as a list of {', '.join(OPS)}")
    if isinstance(ops, str) or not all(isinstance(op, str) for op in ops):
        raise ValueError(f"{where}: ordering.{key} must be a list of {', '.join(OPS)}, got {ops!r}")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"{where}: ordering.{key} has unknown op {unknown[0]!r}; the ops are "
                         f"{', '.join(OPS)}")
    convs = list(ops).count("conv")
    if key != "after_add" and convs != 1:
        raise ValueError(f"{where}: ordering.{key} must wrap exactly one conv, it has {convs}")
    if key == "after_add" and convs:
        raise ValueError(f"{where}: ordering.after_add comes after the addition and can hold no "
                         "conv; weight layers belong in layer and last")
    return tuple(ops)


def parse(data: Any, name: str, where: Optional[str] = None) -> Ordering:
    """An ordering given as data ({layer: [...], last: [...], after_add: [...]}) checked: each
    piece a list of bn/relu/conv, layer and last one conv each, after_add none, and last starting
    as layer does (the pre-activation a unit shares with its shortcut comes before the first
    conv, whichever layer is first). ValueError with one line naming `where` otherwise."""
    where = where or f"block/{name}.yaml"
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: ordering must be a mapping of {', '.join(PIECES)}, got {data!r}")
    extra = sorted(set(map(str, data)) - set(PIECES))
    if extra:
        raise ValueError(f"{where}: ordering has unknown key {extra[0]!r}; its keys are "
                         f"{', '.join(PIECES)}")
    layer, last, after = (_piece(data, key, where) for key in PIECES)
    if last[: last.index("conv")] != layer[: layer.index("conv")]:
        raise ValueError(f"{where}: ordering.last must start as ordering.layer does before its conv "
                         f"({' '.join(layer[: layer.index('conv')]) or 'nothing'}): a unit's "
                         "pre-activation is one")
    return Ordering(layer, last, after, name)


def block_of(model: Mapping, choice: Optional[str] = None) -> "str | Ordering":
    """The block a model config asks for: a paper ordering's name, or the ordering its block file
    gives as data, named by `block` (the file's name). `choice`: Hydra's block choice, when known,
    which a named ordering must match so that run folders and summaries agree."""
    name, data = str(model.get("block")), model.get("ordering")
    if data is None:
        return name
    where = f"block/{choice or name}.yaml"
    if name in ORDERINGS:
        raise ValueError(f"{where}: gives an ordering but names it {name}, a paper ordering; set "
                         f"block: {choice or '<the file name>'} in it")
    if choice and choice != name:
        raise ValueError(f"{where}: names its ordering {name}; set block: {choice}, the file's name "
                         "(run folders and reports use it)")
    return parse(_plain(data), name, where)


def _plain(data: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(data, resolve=True) if OmegaConf.is_config(data) else data


def check_config(model: Mapping, choice: Optional[str] = None) -> None:
    """block_of's checks before a run starts, as IdmapError (one line, exit 2)."""
    try:
        block_of(model, choice)
    except ValueError as exc:
        raise IdmapError(str(exc)) from None
