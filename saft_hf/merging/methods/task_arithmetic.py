"""Task arithmetic: theta_0 + sum_t alpha_t tau_t (one alpha for all tasks, or one per task, or
per-layer rules: [{pattern: regex | glob: pattern, value: alpha or [alpha_t]}, ..., {value: default}],
first match wins, like mergekit's `filter` lists)."""
from __future__ import annotations

from ..engine import per_task
from ..grids import PAPER_ALPHAS
from ..registry import MergeMethod, Param, layer_value, register_method


def weighted_sum(deltas, coeffs):
    """sum_t coeffs[t] * deltas[t], accumulated in task order (a new tensor)."""
    acc = None
    for d, c in zip(deltas, coeffs):
        x = d * c
        acc = x if acc is None else acc.add_(x)
    return acc


def kernel(deltas, ctx):
    return weighted_sum(deltas, per_task(layer_value(ctx.params["scaling"], ctx.key), ctx.num_tasks, "scaling"))


register_method(MergeMethod(
    name="task_arithmetic",
    description="theta_0 + alpha * sum of task vectors (Ilharco et al. 2023); alpha per task allowed",
    params=[Param("scaling", "per_task_float", 0.4, "alpha: one number, a list with one per model, or per-layer rules",
                  grid=PAPER_ALPHAS, symbol="alpha", per_layer=True)],
    kernel=kernel,
    label="task arithmetic",
    short_label="TA",
    linear_param="scaling",
    in_study=True,
    fixed_ablation={"scaling": 0.4},  # the paper's fixed-alpha ablation (table 6)
    order=20,
))
