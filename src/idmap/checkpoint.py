"""Files a run writes, written so that a kill at any instant leaves the previous version intact.

Checkpoints hold tensors and plain containers only and are read with `weights_only=True`, so a
checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from idmap import IdmapError
from idmap.models import SHORTCUT_DEFAULTS

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write via a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files 0600; give them the usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise IdmapError(
                f"disk full while writing {path}; the previous version of it is intact. "
                "Free some space and continue with trainer.resume=true"
            ) from exc
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str), mode="w")


def save_checkpoint(path: str | Path, state: dict) -> None:
    # Serialised in memory first: torch.save reports a full disk as a RuntimeError of its own,
    # a plain write reports it as ENOSPC, which atomic_write turns into a clear message.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise IdmapError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, or objects that are not plain data
        raise IdmapError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            f"It may be truncated or not written by idmap. Move it aside to start the run afresh, "
            f"or point at an intact copy"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise IdmapError(f"{path} is not an idmap checkpoint (format {FORMAT})")
    return state


def model_kwargs(cfg: Any, num_classes: int) -> dict:
    """build_resnet's arguments from a run config (an OmegaConf node or a plain dict)."""
    m, s = cfg["model"], cfg["shortcut"]
    return dict(
        depth=m["depth"],
        num_classes=num_classes,
        block=m["block"],
        shortcut=s["name"],
        unit=m["unit"],
        downsample=m["downsample"],
        widths=list(m["widths"]) if m.get("widths") else None,
        units_per_stage=list(m["units_per_stage"]) if m.get("units_per_stage") else None,
        zero_init_residual=m["zero_init_residual"],
        bn_batch=m.get("bn_batch"),
        checkpointing=m.get("checkpointing", False),
        **{k: s[k] for k in SHORTCUT_DEFAULTS},
    )


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """The trained model of a run directory or checkpoint file, and the run's config as a dict."""
    from idmap.models import build_resnet

    state = load_checkpoint(path, map_location)
    cfg = state["config"]
    model = build_resnet(**model_kwargs(cfg, state["num_classes"]))
    model.load_state_dict(state["model"])
    return model, cfg
