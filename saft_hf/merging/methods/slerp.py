"""SLERP: spherical linear interpolation between two models, tensor by tensor (as in mergekit's
`slerp`, after the gist it cites): with v0, v1 the two flattened tensors and
cos(Omega) = <v0/|v0|, v1/|v1|>, the result is
sin((1 - t) Omega) / sin(Omega) * v0 + sin(t Omega) / sin(Omega) * v1 on the unnormalised
tensors; when |cos(Omega)| > dot_threshold (near-parallel, 0.9995 as in mergekit) it falls back
to linear interpolation (1 - t) v0 + t v1. t = 0 gives the first model, t = 1 the second.
Deliberate difference: when a tensor has norm <= 1e-8 (mergekit's eps) its angle is undefined
and we interpolate linearly; mergekit leaves it unnormalised, so dot = 0 and it returns
sin(t pi / 2) * v1 for a zero v0 (not a point between the two tensors).

Two models exactly (the pretrained model is optional and only the reference the deltas are taken
from; without it the first model is the reference). `t` may be per-layer rules, like mergekit's
t gradients by filter. Computed in float64 (mergekit: float32); the result is cast back.
"""
from __future__ import annotations

import math

import torch

from ..registry import MergeMethod, Param, layer_value, register_method

EPS = 1e-8


def slerp_tensor(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    a, b = v0.to(torch.float64), v1.to(torch.float64)
    na, nb = a.norm().item(), b.norm().item()
    if na <= EPS or nb <= EPS:  # no direction to rotate from / to
        return (1 - t) * a + t * b
    dot = ((a / na) * (b / nb)).sum().item()
    if abs(dot) > dot_threshold:
        return (1 - t) * a + t * b
    omega = math.acos(max(-1.0, min(1.0, dot)))
    sin_omega = math.sin(omega)
    return (math.sin((1 - t) * omega) / sin_omega) * a + (math.sin(t * omega) / sin_omega) * b


def kernel(deltas, ctx):
    pre = ctx.pre.to(deltas.dtype)
    t = layer_value(ctx.params["t"], ctx.key)
    out = slerp_tensor(t, pre + deltas[0], pre + deltas[1], ctx.params["dot_threshold"])
    return out.to(deltas.dtype)  # the weights themselves: base_scale is 0


register_method(MergeMethod(
    name="slerp",
    description="SLERP between exactly two models, per tensor, linear for near-parallel tensors",
    params=[
        Param("t", "float", 0.5, "interpolation: 0 = first model, 1 = second (or per-layer rules)", low=0.0, high=1.0,
              grid=(0.3, 0.5, 0.7), per_layer=True),
        Param("dot_threshold", "float", 0.9995, "|cos| above which the tensors count as parallel (linear fallback)",
              low=0.0, high=1.0),
    ],
    kernel=kernel,
    base_scale=lambda ctx: 0.0,
    label="SLERP",
    short_label="SLERP",
    needs_pretrained=False,
    takes_task_vectors=False,
    whole_tensors=True,
    num_tasks=(2, 2),
    in_study=True,
    order=80,
    coefficient=lambda params, n: params["t"],
))
