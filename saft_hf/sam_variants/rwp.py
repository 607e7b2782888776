"""Random weight perturbation (RWP; Li et al., 2024, "Revisiting Random Weight Perturbation for Efficiently
Improving Generalization") and, for LoRA, Flat-LoRA (Li et al., ICML 2025, "Flat-LoRA: Low-Rank Adaptation
over a Flat Loss Landscape", github.com/nblt/Flat-LoRA).

One pass per micro-batch, at w + e with Gaussian e scaled filter by filter: row i of a weight matrix W gets
e_i ~ N(0, sigma^2 ||W_i||^2 / n), n the row's length (Flat-LoRA's generation rule; `sharpness.filterwise_gaussian`);
1-D tensors (biases, norms) are not perturbed. No first pass, so the cost is about one plain step.

With a PEFT LoRA model the perturbation lives in the full weight space: for each LoRA layer the filter norms
are those of the merged W = W0 + scale * B A, and e is added to the frozen base weight W0 (so the forward
sees W0 + e + BA; the gradient reaches A and B at the perturbed full weight), as Flat-LoRA does. Trainable
matrices outside LoRA layers (a classifier head in modules_to_save) are perturbed directly.

Not implemented: the paper's mixed m-RWP objective (a second, unperturbed pass; 2x cost), ARWP's adaptive
variance and Flat-LoRA's cosine-increasing sigma schedule (sigma is constant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import sharpness
from ..argument_checks import check_nonnegative
from .base import Perturbation, SAMVariant
from .registry import register_sam_variant


@dataclass
class RWPArguments:
    sam_rwp_sigma: float = field(
        default=0.05,
        metadata={"help": "RWP / Flat-LoRA: relative noise level sigma, e_i ~ N(0, sigma^2 ||W_i||^2 / n) per "
                  "filter (Flat-LoRA's default 0.05). With sam_variant='rwp', sam_rho only switches SAM on (> 0)."},
    )


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The PEFT LoRA layers of `model` that carry an active adapter (they have base_layer and get_delta_weight)."""
    layers = []
    for module in model.modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "get_delta_weight"):
            if any(name in module.lora_A for name in getattr(module, "active_adapters", [])):
                layers.append(module)
    return layers


@register_sam_variant("rwp")
class RWP(SAMVariant):
    model_card_tags = ("rwp",)
    arguments = RWPArguments

    @classmethod
    def validate_arguments(cls, args) -> None:
        check_nonnegative(args, "sam_rwp_sigma")
        if args.sam_rwp_sigma == 0:
            raise ValueError("sam_rwp_sigma must be > 0 with sam_variant='rwp' (use sam_rho=0 to train plainly).")

    def unsupported_reason(self, setup):
        if setup.peft and setup.distributed == "fsdp2":
            return ("Flat-LoRA perturbs the frozen base weight W0 by the filter norms of W0 + BA, a product of "
                    "sharded factors that FSDP2 would have to gather for every LoRA layer; not implemented. Use DDP "
                    "or DeepSpeed ZeRO-1/2 for RWP with LoRA (RWP without LoRA runs under FSDP2).")
        if setup.peft and setup.zero_stage == 3:
            return ("Flat-LoRA perturbs the frozen base weights, which DeepSpeed ZeRO-3 partitions and does not "
                    "gather for frozen tensors here; use ZeRO-1/2 or DDP.")
        return None

    def takes_first_pass(self, step) -> bool:
        return False

    def perturbation(self, step, grads):
        rank = 0 if (step.synced_first_pass or step.world_size == 1) else step.rank
        generator = torch.Generator().manual_seed(
            sharpness.noise_seed(self.args.seed, step.global_step, step.micro_batch, rank))
        layers = lora_layers(step.model) if step.model is not None else []
        if not layers:
            noise = sharpness.filterwise_gaussian(step.params, self.args.sam_rwp_sigma, generator)
            return Perturbation(applied=True, tensors=noise, norm=sharpness.global_norm(noise))
        return self._flat_lora(step, layers, generator)

    def _flat_lora(self, step, layers, generator) -> Perturbation:
        targets, merged = [], []
        adapter_params = set()
        for layer in layers:
            base = layer.get_base_layer().weight
            delta = sum(layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A)
            full = base.detach() + delta.to(base.dtype)
            if getattr(layer, "fan_in_fan_out", False):  # Conv1D stores (in, out): filters are columns
                full = full.T
            targets.append(base)
            merged.append(full)
            adapter_params.update(id(p) for p in layer.parameters() if p.requires_grad)
        noise = sharpness.filterwise_gaussian(merged, self.args.sam_rwp_sigma, generator)
        noise = [n.T if getattr(layer, "fan_in_fan_out", False) else n for n, layer in zip(noise, layers)]
        others = [p for p in step.params if id(p) not in adapter_params]  # e.g. a trained classifier head
        noise += sharpness.filterwise_gaussian(others, self.args.sam_rwp_sigma, generator)
        return Perturbation(applied=True, tensors=noise, params=targets + others, norm=sharpness.global_norm(noise))
