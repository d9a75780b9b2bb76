"""What comes in from outside, checked before Hydra reads a file for it: command lines (an option is
a name, never a path), the folders on hydra.searchpath (unit files only), a run's or sweep's record
(this project's settings only), a unit file (block and ordering only)."""

import dataclasses
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from idmap import IdmapError, one_line_message
from idmap.config import Config, keys
from idmap.paths import CONF

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a config option's name: no path
_FIELDS = {f.name for f in dataclasses.fields(Config)}  # the schema's sections and top-level keys
# Launcher settings a sweep's record may replay: resources and queues. Not submitit's setup or
# srun_args (commands), submitit_folder or additional_parameters (files written elsewhere), _target_.
LAUNCHER_KEYS = {"partition", "account", "qos", "timeout_min", "nodes", "tasks_per_node", "gpus_per_node",
                 "gpus_per_task", "cpus_per_task", "cpus_per_gpu", "mem_gb", "mem_per_cpu", "mem_per_gpu",
                 "constraint", "exclude", "comment", "array_parallelism", "signal_delay_s",
                 "max_num_timeout", "name", "n_jobs"}


def check_overrides(args: Sequence[str], record: Optional[Path] = None) -> None:
    """IdmapError for overrides that would make Hydra read a file it must not: a group option that
    is a path (block=../depth/20 loads another group's file, block=../../X any YAML), or a search
    path folder that holds more than unit files (check_unit_file). `record`: the file the
    overrides were replayed from (a run's .hydra/overrides.yaml, a sweep's multirun.yaml), which
    may hold this project's settings only (_check_replayed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    folders, overrides = [], []
    for before, arg in zip(["", *args], args):  # Hydra's flags, those with a value, then overrides
        if before in ("-cd", "--config-dir") or arg.startswith("--config-dir="):
            folders.append(arg.split("=", 1)[1] if arg.startswith("--config-dir=") else arg)
        elif not arg.startswith("-") and before not in ("-cp", "--config-path", "-cn", "--config-name",
                                                        "-c", "--cfg", "-p", "--package"):
            overrides.append(arg)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # Hydra's grammar: one line
        raise IdmapError(one_line_message(exc)) from None
    for o in parsed:
        if record is not None:
            _check_replayed(o, record)
        if o.key_or_group == "hydra.searchpath":
            folders += [str(entry) for entry in (o.value() or [])]
        elif "." not in o.key_or_group and o.key_or_group not in _FIELDS and not o.is_delete():
            value = o.value()
            names = value.list if isinstance(value, ChoiceSweep) else value if isinstance(value, list) else [value]
            for name in (getattr(n, "text", n) for n in names):
                if name is not None and not _NAME.fullmatch(str(name)):
                    raise IdmapError(f"{o.input_line}: {o.key_or_group} takes an option's name (python "
                                     f"train.py --help lists them), not a path; a unit of your own is a "
                                     f"block file in DIR/block/ with DIR on hydra.searchpath")
    for folder in folders:
        _check_search_folder(folder)


def _check_replayed(o, record: Path) -> None:
    """An override a run's record replays: one of this project's settings, or of the launcher's
    resources; never a class (_target_), a callback or any other Hydra setting, nor a line break."""
    key, text = o.key_or_group, o.input_line
    ours = key in keys() or key.startswith(("model.ordering.", "tags.")) or (CONF / key).is_dir()
    hydra = key in ("hydra.searchpath", "hydra.job.chdir") or (
        key.startswith("hydra.launcher.") and key[len("hydra.launcher."):] in LAUNCHER_KEYS)
    if not (ours or (hydra and text.startswith("hydra."))) or "_target_" in text or not text.isprintable():
        raise IdmapError(f"{record}: {text!r} is not one of this project's settings, and a run's record "
                         f"replays only those; delete it from the file (or give it on your own command line)")


def _check_search_folder(entry: str) -> None:
    """A folder Hydra searches for configs holds unit files only, each checked: any other YAML in
    it could be loaded as an option of another group, or replace Hydra's own settings."""
    scheme, sep, rest = entry.partition("://")
    if sep and scheme != "file":
        raise IdmapError(f"hydra.searchpath: {entry}: give unit files in a folder, file://DIR")
    folder = Path(rest if sep else entry)
    for top, dirs, files in os.walk(folder):  # a folder that does not exist yields nothing
        for name in sorted(dirs + files):
            path = Path(top) / name
            # A linked folder is not walked here, but Hydra would follow it.
            if (path.is_symlink() and path.is_dir()) or (name.endswith(".yaml") and path.parent != folder / "block"):
                raise IdmapError(f"{path}: a folder on hydra.searchpath holds unit files only "
                                 f"(block/<name>.yaml); move this out of {folder}")
            if name.endswith(".yaml"):
                check_unit_file(path)


def check_unit_file(path: Path) -> None:
    """A unit of one's own, read as data before Hydra loads it: `# @package model` and the keys block
    and ordering only (what they hold is checked when the unit is used, orderings.check_config).
    Any other key, package or defaults list could set Hydra's callbacks or any setting, so that a
    unit from elsewhere could run code or change a run."""
    import yaml
    from hydra.plugins.config_source import ConfigSource

    text = path.read_text(errors="replace")
    try:
        package, data = ConfigSource._get_header_dict(text)["package"], yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise IdmapError(f"{path}: unreadable ({str(exc).splitlines()[0]})") from None
    extra = sorted(map(str, set(data) - {"block", "ordering"})) if isinstance(data, dict) else ["(not a mapping)"]
    if (CONF / "block" / path.name).is_file():
        raise IdmapError(f"{path}: the paper's block {path.stem} has this name, and Hydra would load the "
                         f"paper's; rename the file (and set block: to its new name)")
    if package != "model" or extra:
        raise IdmapError(f"{path}: a unit file sets the model's block and ordering only, under '# @package "
                         f"model'; it has {f'package {package}' if package != 'model' else extra[0]}")
