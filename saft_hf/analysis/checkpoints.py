"""Task vectors from fine-tuned checkpoints on disk, for the diagnostics.

Weights are read as stored (`saft_hf.merging.open_source`: HF model dirs, safetensors / .bin files,
sharded or not), so nothing is randomly initialized on load (e.g. a pooler the checkpoint lacks).
Only floating-point weights present in both theta0 and the checkpoint enter the task vector.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

__all__ = ["load_state_dict", "task_vectors_from_checkpoints"]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor stored in a checkpoint (directory or file), keyed as stored.

    A name that is not an existing path is loaded as a model (`AutoModel.from_pretrained`, e.g. a hub name).
    """
    from saft_hf.merging import open_source
    from saft_hf.model_paths import hub_load_errors

    if not Path(path).exists():
        from transformers import AutoModel

        with hub_load_errors(path, "checkpoint"):
            model = AutoModel.from_pretrained(str(path))
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    src = open_source(str(path))
    try:
        return {k: src.get(k) for k in src.keys()}
    finally:
        src.close()


def task_vectors_from_checkpoints(pretrained: Mapping[str, torch.Tensor],
                                  checkpoints: Mapping[str, str | Path]) -> dict[str, dict[str, torch.Tensor]]:
    """{task: checkpoint} -> {task: tau = finetuned - pretrained} via `saft_hf.merging.task_vector`."""
    from saft_hf.merging import task_vector

    out = {}
    for task, path in checkpoints.items():
        ft = load_state_dict(path)
        common = [k for k, v in pretrained.items() if k in ft and torch.is_floating_point(v)]
        if not common:
            raise KeyError(f"checkpoint {path} (task {task!r}) shares no weight names with the pretrained model; "
                           f"e.g. pretrained has {list(pretrained)[:2]}, checkpoint has {list(ft)[:2]}")
        missing = _missing_weights(pretrained, ft)
        if missing:
            # A partial checkpoint would silently analyse "fine-tuned" = pretrained for the rest.
            raise KeyError(f"checkpoint {path} (task {task!r}) is missing {len(missing)} of the pretrained model's "
                           f"{sum(torch.is_floating_point(v) for v in pretrained.values())} weights, e.g. "
                           f"{missing[:3]}; it is truncated or from another architecture - save the complete "
                           "fine-tuned model (save_pretrained) and run again")
        out[task] = task_vector({k: pretrained[k] for k in common}, {k: ft[k] for k in common})
    return out


def _missing_weights(pretrained: Mapping[str, torch.Tensor], ft: Mapping[str, torch.Tensor]) -> list[str]:
    """Floating-point pretrained weights absent from `ft`, except tied copies (an output projection
    stored once, as its input embedding: a matrix equal to a pretrained weight that `ft` does hold;
    vectors are never taken as tied, freshly initialised norms and biases are all equal)."""
    missing = []
    for key, value in pretrained.items():
        if key in ft or not torch.is_floating_point(value):
            continue
        tied = value.dim() >= 2 and any(other in ft and other != key and pretrained[other].shape == value.shape
                   and torch.equal(pretrained[other], value) for other in pretrained)
        if not tied:
            missing.append(key)
    return missing
