"""What a merge's output directory may be, and which non-weight files (config.json, tokenizer)
go into it: the output never touches an input, and an output that `from_pretrained` cannot load
is said so."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..io_utils import check_output
from .io import ADAPTER_CONFIG, CheckpointError, resolve_checkpoint, weight_files

# Files of the base model directory that are never copied to the output (they describe the
# input, or the merge writes its own).
_SKIP_COPY = {"README.md", ADAPTER_CONFIG, "merge_config.yaml", "merge_report.json", "mergekit_config.yml"}


def merge_inputs(config) -> list[str]:
    """Every path a merge reads: pretrained, models, `config:`; Hub ids as their cached snapshot."""
    specs = [config.pretrained, getattr(config, "config", None)]
    specs += [m.get("path") if isinstance(m, dict) else getattr(m, "path", m) for m in (config.models or [])]
    out = []
    for spec in specs:
        if not isinstance(spec, (str, os.PathLike)):
            continue
        out.append(str(spec))
        if not os.path.lexists(spec):
            try:
                out.append(str(resolve_checkpoint(spec)))
            except CheckpointError:
                pass  # reported when the merge opens it
    return out


def check_merge_output(config, output_dir, overwrite: bool) -> list[str]:
    """Refuse a bad output before any work (see io_utils.check_output); return the input paths
    for `atomic_directory(..., inputs=...)`, which checks again at the end."""
    inputs = merge_inputs(config)
    check_output(output_dir, inputs, overwrite=overwrite, directory=True)
    return inputs


def _check_json(path: Path) -> None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read model config {path}: {exc}; give the base model's config.json") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"model config {path} is not a JSON object; give the base model's config.json")


def model_files_source(reference_spec, config_spec=None) -> tuple[Path | None, list[str]]:
    """Where the output's config.json and tokenizer files come from (a directory, a config.json
    file, or None), and notes for the user. `config_spec` is the merge config's `config:` key;
    without it the reference (pretrained) model's directory is used."""
    if config_spec is not None:
        if not isinstance(config_spec, (str, os.PathLike)):
            raise ValueError(f"`config:` must be a path (the base model's directory or its config.json), "
                             f"got {config_spec!r}")
        src = Path(config_spec)
        if src.is_dir():
            if not (src / "config.json").is_file():
                raise CheckpointError(f"`config: {config_spec}` has no config.json; give the base model's directory "
                                      "or its config.json file")
            _check_json(src / "config.json")
            return src, []
        if src.is_file():
            _check_json(src)
            return src, []
        raise CheckpointError(f"`config: {config_spec}` does not exist; give the base model's directory or its "
                              "config.json file")
    base = resolve_checkpoint(reference_spec)
    fix = ("add `config: DIR` to the merge config (the base model's directory, or its config.json) to copy the "
           "model config and tokenizer files")
    if base.is_dir():
        if (base / "config.json").is_file():
            return base, []
        return base, [f"{reference_spec} has no config.json, so the output has none and from_pretrained cannot "
                      f"load it; {fix}"]
    beside = f" (there is one beside it: `config: {base.parent}`)" if (base.parent / "config.json").is_file() else ""
    return None, [f"{reference_spec} is a single weights file, so the output has no config.json and "
                  f"from_pretrained cannot load it; {fix}{beside}"]


def copy_model_files(source: Path | None, dst: Path) -> list[str]:
    """Copy config/tokenizer files (not weights) from `source` (see model_files_source) to `dst`."""
    if source is None:
        return []
    if source.is_file():
        shutil.copyfile(source, dst / "config.json")
        return ["config.json"]
    weights = {p.name for p in weight_files(source)}
    copied = []
    for p in sorted(source.iterdir()):
        if p.is_file() and p.name not in weights and p.name not in _SKIP_COPY and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied
