"""Which parameters train: full fine-tuning, or FTLO (the attention linear layers only).

FTLO follows "fine-tuning attention modules only" (Jin et al., 2025), used by the SAFT paper as a
merge-friendly baseline: only the query / key / value / output projections of every self-attention
block train; embeddings, MLPs, layer norms and the projection head stay at their pretrained values,
so task vectors are zero outside attention. A "linear layer" here is the whole `nn.Linear`, weight
AND bias (the paper speaks of linear layers, not weight matrices); pass `include_bias=False` to
train the weight matrices alone.
"""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn

# Attention projection module names across the model families the project uses:
# CLIP / ViT-style (`self_attn.{q,k,v,out}_proj`), BERT / MiniLM (`attention.self.{query,key,value}`,
# `attention.output.dense`) and T5 (`SelfAttention.{q,k,v,o}`, `EncDecAttention.{q,k,v,o}`).
ATTENTION_LINEAR_PATTERNS: tuple[str, ...] = (
    r"(^|\.)self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
    r"(^|\.)attention\.self\.(query|key|value)$",
    r"(^|\.)attention\.output\.dense$",
    r"(^|\.)(SelfAttention|EncDecAttention)\.(q|k|v|o)$",
)

FINETUNING_MODES = ("full", "ftlo", "ftts")


def attention_linear_modules(model: nn.Module, patterns: Iterable[str] = ATTENTION_LINEAR_PATTERNS) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules of `model` whose qualified names match one of `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(c.search(name) for c in compiled)
    }


def ftlo_parameter_names(model: nn.Module, include_bias: bool = True,
                         patterns: Iterable[str] = ATTENTION_LINEAR_PATTERNS) -> list[str]:
    names = []
    for module_name, module in attention_linear_modules(model, patterns).items():
        names.append(f"{module_name}.weight")
        if include_bias and module.bias is not None:
            names.append(f"{module_name}.bias")
    return names


def apply_finetuning_mode(model: nn.Module, mode: str, include_bias: bool = True,
                          patterns: Iterable[str] = ATTENTION_LINEAR_PATTERNS) -> list[str]:
    """Set `requires_grad` for `mode` in {"full", "ftlo"} and return the trainable parameter names.

    "ftts" (linearized) trains every parameter of the wrapped model; wrap the model with
    `saft_hf.finetuning.linearized.LinearizedModel` (this function treats it like "full").
    """
    mode = mode.lower()
    if mode not in FINETUNING_MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {FINETUNING_MODES}")
    if mode in ("full", "ftts"):
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    wanted = set(ftlo_parameter_names(model, include_bias, patterns))
    if not wanted:
        raise ValueError(
            f"FTLO found no attention linear layers in {type(model).__name__}; its module names match none of "
            f"{list(patterns)}. Pass `patterns=` with regexes for this architecture's q/k/v/out projections."
        )
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
