"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): each task vector is masked per tensor to the
band between its largest `beta` fraction and its smallest magnitudes (`density` of the entries
kept; transform `breadcrumbs_mask`), then task arithmetic: theta_0 + alpha * sum_t mask_t * tau_t.
Paper: ~90% sparsity (density 0.1) with ~1% outliers removed; alpha searched. Counting conventions
are mergekit's `breadcrumbs` (see transforms/breadcrumbs_mask.py). `scaling` may be one alpha,
one per model, or per-layer rules, as for task arithmetic. The mask alone can be put in front of
any method: `transforms: [{name: breadcrumbs_mask, density: 0.1, beta: 0.01}]`.
"""
from __future__ import annotations

from ..engine import per_task
from ..grids import PAPER_ALPHAS
from ..registry import MergeMethod, Param, layer_value, register_method
from ..transforms.breadcrumbs_mask import BREADCRUMBS_DENSITIES
from .task_arithmetic import weighted_sum


def kernel(deltas, ctx):  # the task vectors arrive masked (pre_transforms)
    return weighted_sum(deltas, per_task(layer_value(ctx.params["scaling"], ctx.key), ctx.num_tasks, "scaling"))


register_method(MergeMethod(
    name="breadcrumbs",
    description="Model Breadcrumbs (Davari & Belilovsky 2024): drop each tensor's largest beta and smallest "
                "magnitudes (density kept), then task arithmetic",
    params=[
        Param("scaling", "per_task_float", 1.0, "alpha: one number, one per model, or per-layer rules",
              grid=PAPER_ALPHAS, symbol="alpha", per_layer=True),
        Param("density", "float", 0.1, "fraction of each tensor's entries kept", low=0.0, high=1.0, low_open=True,
              grid=BREADCRUMBS_DENSITIES),
        Param("beta", "float", 0.01, "fraction of each tensor's largest magnitudes dropped", low=0.0, high=1.0,
              high_open=True),
    ],
    kernel=kernel,
    pre_transforms=lambda p: [("breadcrumbs_mask", {"density": p["density"], "beta": p["beta"]})],
    label="Breadcrumbs",
    short_label="BC",
    linear_param="scaling",
    in_study=True,
    order=40,
))
