"""Model Stock (Jang et al., ECCV 2024): per layer, move from the pretrained weights toward the
average of the k fine-tuned models by t = k cos(theta) / (1 + (k - 1) cos(theta)), theta the
angle between the fine-tuned deltas: w = w_0 + t * mean_t(tau_t) = t * w_avg + (1 - t) * w_0.

With more than two models cos(theta) is the mean of the pairwise cosines, per tensor (or per row
with `filter_wise`), as mergekit's `model_stock` does. Deliberate differences: a cosine is 0 only
when a delta is exactly zero (mergekit clamps |a||b| at 1e-6, which shrinks the cosine of small
tensors such as biases toward 0), and cos(theta) is clamped to [0, 1] so t stays in [0, 1] (the
paper assumes an acute angle; at cos = -1/(k-1) the formula divides by zero). cos = 1 gives
t = 1, the plain average. Cosines are accumulated in float64. Needs at least two models.
"""
from __future__ import annotations

import torch

from ..registry import MergeMethod, Param, register_method


def interpolation_ratio(deltas: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """t per tensor (a 0-d tensor) or per row (shape[0] x 1), from the pairwise cosines."""
    num = deltas.shape[0]
    rows = deltas.shape[1] if filter_wise and deltas.dim() > 2 else 1  # a 1-D tensor is one row
    x = deltas.reshape(num, rows, -1).to(torch.float64)
    norms = x.norm(dim=-1)
    cosines = []
    for i in range(num):
        for j in range(i + 1, num):
            denom = norms[i] * norms[j]
            dot = (x[i] * x[j]).sum(-1)
            cosines.append(torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), 0.0).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(0).clamp(0.0, 1.0)
    return num * cos / (1 + (num - 1) * cos)


def kernel(deltas, ctx):
    t = interpolation_ratio(deltas, ctx.params["filter_wise"])
    mean = deltas.mean(0)
    if ctx.params["filter_wise"] and deltas.dim() > 2:
        t = t.view(-1, *([1] * (deltas.dim() - 2)))
    else:
        t = t.reshape(())
    ctx.report.setdefault("t", {})[ctx.key] = round(float(t.mean()), 6)
    return mean * t.to(mean.dtype)


register_method(MergeMethod(
    name="model_stock",
    description="Model Stock (Jang et al. 2024): per layer, w_0 + t * mean delta with t = k cos / (1 + (k-1) cos) "
                "from the angle between the fine-tuned deltas",
    params=[Param("filter_wise", "bool", False, "one ratio per row (output filter) instead of per tensor")],
    kernel=kernel,
    label="Model Stock",
    short_label="MS",
    whole_tensors=True,
    num_tasks=(2, None),
    in_study=True,
    order=70,
))
