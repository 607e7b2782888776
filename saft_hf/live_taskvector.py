"""The task vector of a model while it trains: tau = current weights - pretrained weights, keyed
like the pretrained state dict, without touching the live weights.

Full fine-tuning: every floating-point tensor of the pretrained state dict, current minus
pretrained (frozen tensors that start at the pretrained values give exact zeros).
PEFT LoRA: the base weights are frozen, each adapted weight gets peft's own merge delta
(`get_delta_weight`: B @ A * scale, transposed for fan_in_fan_out), and fully trained copies
(`modules_to_save`) give `copy - pretrained` - the same delta `saft_hf.merging` forms from a saved
adapter directory (`LoraTaskVector`).
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _clean_key(key: str) -> str:
    """A peft state-dict key as the plain model names it (adapter and wrapper parts removed)."""
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    key = key.replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)


def current_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under plain-model names (views of the live tensors, no copies).
    For a peft model, LoRA matrices and the frozen originals of modules_to_save are left out."""
    sd = model.state_dict(keep_vars=False)
    if not _is_peft(model):
        return dict(sd)
    out = {}
    for k, v in sd.items():
        if _LORA_KEY.search(k) or ".original_module." in k:
            continue
        out[_clean_key(k)] = v
    return out


@torch.no_grad()
def lora_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{plain weight key: merged-adapter delta} for every LoRA layer's active adapter(s)."""
    if not _is_peft(model):
        return {}
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A and adapter not in module.lora_embedding_A:
                continue
            if module.use_dora.get(adapter, False):
                raise ValueError(f"{name} uses DoRA, whose update is not B@A*scale; the live task vector supports plain LoRA only")
            delta = module.get_delta_weight(adapter).detach().to("cpu", torch.float32)
            key = _clean_key(f"{name}.weight")
            out[key] = out[key] + delta if key in out else delta
    return out


def find_prefix(model_keys, pretrained_keys: list[str]) -> str:
    """The prefix p with p + key in the model for every pretrained key ('' if names already match;
    'bert.' or 'encoder.' when the pretrained weights are the encoder of a model with a head)."""
    model_keys = set(model_keys)
    if not pretrained_keys:
        raise ValueError("the pretrained state dict has no floating-point tensors")
    if all(k in model_keys for k in pretrained_keys):
        return ""
    first = pretrained_keys[0]
    candidates = sorted({k[: -len(first)] for k in model_keys if k.endswith("." + first)}, key=len)
    for p in candidates:
        if all(p + k in model_keys for k in pretrained_keys):
            return p
    missing = [k for k in pretrained_keys if k not in model_keys][:3]
    raise KeyError(f"the training model has no weights matching the pretrained keys (e.g. {missing}); the pretrained "
                   "state dict must be the model's own initial weights or those of one of its submodules "
                   "(pass model_prefix='<submodule>.' if the prefix cannot be inferred)")


@torch.no_grad()
def live_task_vector(model: torch.nn.Module, pretrained: Mapping[str, torch.Tensor],
                     prefix: str | None = None) -> dict[str, torch.Tensor]:
    """{pretrained key: current - pretrained} (float32, CPU) for every floating-point pretrained tensor.

    `model` may be a plain module or a peft LoRA model; `prefix` maps pretrained names into the
    model's names (inferred when None). Memory: one float32 copy of the pretrained keys' size."""
    keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    current = current_weights(model)
    prefix = find_prefix(current, keys) if prefix is None else prefix
    lora = lora_deltas(model)
    out = {}
    for k in keys:
        name = prefix + k
        if name not in current:
            raise KeyError(f"pretrained key {k!r} has no counterpart {name!r} in the training model")
        cur, base = current[name], pretrained[k]
        if tuple(cur.shape) != tuple(base.shape):
            raise ValueError(f"shape mismatch for {k!r}: pretrained {list(base.shape)} vs training model {list(cur.shape)}")
        delta = cur.detach().to("cpu", torch.float32) - base.detach().to("cpu", torch.float32)
        if name in lora:
            delta += lora[name]
        out[k] = delta
    return out
