"""The one argument parser of every recipe script: `HfArgumentParser` dataclasses + `--config YAML`.

    model_args, data_args, training_args = parse_recipe_args(
        (ModelArguments, DataArguments, SAFTTrainingArguments), argv)

- `--config FILE.yaml` holds a mapping of option names to values; it is read first and every
  option given on the command line overrides it (the YAML becomes `--key value` items placed
  before the command line, so the types, choices and checks are the parser's own).
- Keys that are no field of the dataclasses are rejected, naming the valid ones.
- `positional="runs"`: bare leading arguments (before the first `--option`) fill that list field,
  for scripts called as `script.py DIR1 DIR2 --output-dir OUT`.
- `required=("task",)`: fields that must be set by the YAML or the command line.

Foundations layer: imports nothing from saft_hf.
"""
from __future__ import annotations

import difflib
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Sequence

__all__ = ["parse_recipe_args", "read_yaml_config", "yaml_to_argv"]


def yaml_to_argv(config: dict) -> list[str]:
    """A YAML mapping as `--key value` command-line items (lists expand, booleans as true/false,
    mappings as JSON, None skipped)."""
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, bool):
            argv.append(str(value).lower())
        elif isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


def read_yaml_config(path: str | Path, valid: Sequence[str]) -> dict:
    """The mapping in a YAML config file; unknown keys are an error that lists the valid ones."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values, got {type(config).__name__}")
    valid_set = set(valid)
    unknown = sorted(k for k in config if k not in valid_set)
    if unknown:
        hints = {k: difflib.get_close_matches(k, sorted(valid_set), n=1) for k in unknown}
        hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in hints.items() if m)
        raise ValueError(f"{path}: unknown option(s) {unknown}" + (f" ({hint})" if hint else "")
                         + f". Valid options: {', '.join(sorted(valid_set))}")
    return config


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    for i, item in enumerate(argv):
        if item == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a YAML file path")
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if item.startswith("--config="):
            return item.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def parse_recipe_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None,
                      positional: str | None = None, required: Sequence[str] = (),
                      description: str | None = None) -> tuple:
    """Parse `argv` (default sys.argv[1:]) into one instance per dataclass; see the module docstring."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    valid = [f.name for cls in dataclass_types for f in fields(cls) if f.init]
    parser = HfArgumentParser(tuple(dataclass_types), description=description)
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="YAML file of option: value pairs; command-line options override it")
    config_path, argv = _split_config(argv)
    if positional is not None:
        lead = 0
        while lead < len(argv) and not argv[lead].startswith("-"):
            lead += 1
        if lead:
            argv = [f"--{positional}", *argv[:lead], *argv[lead:]]
    config = read_yaml_config(config_path, valid) if config_path else {}
    outputs = parser.parse_args_into_dataclasses(args=yaml_to_argv(config) + argv)
    missing = [name for name in required
               if all(getattr(obj, name, None) in (None, "", []) for obj in outputs if hasattr(obj, name))]
    if missing:
        parser.error(f"{', '.join('--' + m for m in missing)} required (in the YAML config or on the command line)")
    return tuple(outputs[: len(dataclass_types)])
