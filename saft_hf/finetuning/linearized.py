"""FTTS: fine-tuning in the tangent space of the pretrained weights (linearized fine-tuning).

The model is replaced by its first-order Taylor expansion around the pretrained weights theta0:

    f_lin(x; theta) = f(x; theta0) + J_theta f(x; theta0) (theta - theta0)

computed exactly, in one pass, with forward-mode AD (`torch.func.jvp`). Gradients of the loss with
respect to theta flow through the tangent (theta - theta0) by ordinary reverse-mode autograd.

Design choices:
- The trainable parameters are theta itself (the wrapped module's own parameters), not the delta.
  So the wrapped module's `state_dict` / `save_pretrained` is a normal checkpoint with weights
  theta0 + delta, its task vector is theta - theta0 like any other, and ASAM's adaptive scaling
  (which multiplies the perturbation by |w|) sees the real weights rather than a delta that starts
  at zero (which would make the first ASAM perturbations vanish).
- theta0 is kept as non-persistent buffers: it moves with `.to(device)` but is never saved.
- A merged linearized model (theta0 + sum_t alpha_t tau_t) must be evaluated with the linearized
  forward too: wrap it with `LinearizedModel(merged, pretrained_state=pretrained.state_dict())`.
  The plain forward of the same weights is a different function (see docs/vision.md).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.func import functional_call, jvp


class LinearizedOutput(dict):
    """The wrapped model's tensor outputs (linearized), readable as keys or attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


class LinearizedModel(nn.Module):
    """Wrap `model` so its forward is the first-order Taylor expansion around `pretrained_state`.

    Only parameters with `requires_grad=True` at wrapping time are linearized (the others stay
    fixed constants of f), so FTTS combines with FTLO-style selections. `pretrained_state` defaults
    to a copy of `model`'s current parameters, i.e. wrap the pretrained model before training.
    Outputs: a Tensor output stays a Tensor; a ModelOutput / dict becomes a `LinearizedOutput` of
    its tensor fields (tuples such as hidden_states are dropped).
    """

    def __init__(self, model: nn.Module, pretrained_state: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        _use_forward_ad_compatible_attention(model)
        self.model = model
        self._linearized_names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self._linearized_names:
            raise ValueError("LinearizedModel: the model has no trainable parameters to linearize")
        self.theta0 = nn.Module()  # holds the expansion point as non-persistent buffers
        params = dict(model.named_parameters())
        for name in self._linearized_names:
            if pretrained_state is not None:
                if name not in pretrained_state:
                    raise KeyError(f"pretrained_state has no tensor {name!r}; it must cover every trainable parameter")
                value = pretrained_state[name]
                if value.shape != params[name].shape:
                    raise ValueError(f"pretrained_state[{name!r}] has shape {tuple(value.shape)}, the model's is "
                                     f"{tuple(params[name].shape)}")
            else:
                value = params[name]
            self.theta0.register_buffer(_buffer_name(name), value.detach().clone().to(params[name]), persistent=False)

    # forward ---------------------------------------------------------------------------------

    def expansion_point(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self.theta0, _buffer_name(n)) for n in self._linearized_names}

    def forward(self, *args, **kwargs):
        params = dict(self.model.named_parameters())
        theta0 = self.expansion_point()
        tangent = {n: params[n] - theta0[n] for n in self._linearized_names}
        structure: dict = {}

        def f(p):
            return _flatten_output(functional_call(self.model, p, args, kwargs), structure)

        primal, directional = jvp(f, (theta0,), (tangent,))
        values = tuple(a + b for a, b in zip(primal, directional))
        if structure["kind"] == "tensor":
            return values[0]
        return LinearizedOutput(zip(structure["keys"], values))

    # weights ---------------------------------------------------------------------------------

    def task_vector(self) -> dict[str, torch.Tensor]:
        theta0 = self.expansion_point()
        params = dict(self.model.named_parameters())
        return {n: (params[n] - theta0[n]).detach() for n in self._linearized_names}

    def save_pretrained(self, save_directory, **kwargs):
        """Save the wrapped model (weights theta = theta0 + delta) as a normal checkpoint."""
        return self.model.save_pretrained(save_directory, **kwargs)

    def unwrap(self) -> nn.Module:
        return self.model


def _use_forward_ad_compatible_attention(model: nn.Module) -> None:
    # Fused attention kernels (SDPA flash / memory-efficient) have no forward-mode derivative, so
    # jvp through them fails; the eager attention computes the same function with plain ops.
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", "eager") != "eager":
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError(f"LinearizedModel needs eager attention (forward-mode AD); load the model with "
                             f"attn_implementation='eager' (it uses {config._attn_implementation!r})")
        model.set_attn_implementation("eager")


def _buffer_name(param_name: str) -> str:
    return param_name.replace(".", "__")


def _flatten_output(out, structure: dict) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        structure["kind"] = "tensor"
        return (out,)
    if isinstance(out, Mapping):  # transformers ModelOutput is an OrderedDict
        keys = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        structure["kind"], structure["keys"] = "mapping", keys
        return tuple(out[k] for k in keys)
    if isinstance(out, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in out):
        structure["kind"], structure["keys"] = "mapping", list(range(len(out)))
        return tuple(out)
    raise TypeError(f"LinearizedModel cannot linearize an output of type {type(out).__name__}; the model must "
                    "return a Tensor, a dict/ModelOutput of Tensors or a tuple of Tensors")
