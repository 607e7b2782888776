"""DELLA-Merging (Deep et al. 2024): MagPrune each task vector (transform `magprune`: keep
probabilities linear in the magnitude rank within each row, density -/+ epsilon, survivors
divided by their keep probability), then TIES' sign election and disjoint fusion (no magnitude
trim: the drop already sparsified), scaled by lambda.

Election and fusion follow mergekit's `della` (contributed by the DELLA authors): sign of the sum
of the pruned deltas, ties (sum exactly 0) resolved to +, mean of the entries that agree with the
elected sign (`zero_sign: majority` gives them the model-wide majority sign instead, as the TIES
code does). MagPrune alone can be put in front of TIES or any other method:
`transforms: [{name: magprune, density: 0.5, epsilon: 0.1}]`.
"""
from __future__ import annotations

from .. import engine
from ..grids import PAPER_ALPHAS
from ..registry import DEFER, MergeMethod, Param, layer_value, register_method
from ..transforms.magprune import MAGPRUNE_PARAMS, check as magprune_check
from .ties import DISJOINT_MODES, SIGN_METHODS, ZERO_SIGNS, ties_direction

_MAGPRUNE_KEYS = [p.name for p in MAGPRUNE_PARAMS]


def prepass(ctx) -> None:
    ctx.state.update(sign_total=0, work=engine.Scratch())


def kernel(deltas, ctx):  # the task vectors arrive MagPruned (pre_transforms)
    p = ctx.params
    zero_sign = ctx.state["majority"] if ctx.final else (1 if p["zero_sign"] == "positive" else None)
    merged, elected_sum, ambiguous = ties_direction(deltas, [None] * ctx.num_tasks, p["sign_method"], p["disjoint"],
                                                    zero_sign, ctx.state["work"])
    if not ctx.final:
        ctx.state["sign_total"] += elected_sum
        if zero_sign is None and ambiguous:
            return DEFER  # needs the model-wide majority sign (zero_sign: majority)
    scaling = layer_value(p["scaling"], ctx.key)
    return merged if scaling == 1.0 else scaling * merged


def after_pass(ctx) -> None:
    ctx.state["majority"] = 1 if ctx.state["sign_total"] >= 0 else -1


register_method(MergeMethod(
    name="della",
    description="DELLA (Deep et al. 2024): MagPrune (magnitude-ranked drop probabilities, rescaled), "
                "then TIES sign election and disjoint mean, scaled by lambda",
    params=[
        Param("scaling", "float", 1.0, "lambda, multiplies the merged task vector (or per-layer rules)",
              grid=PAPER_ALPHAS, symbol="lambda", per_layer=True),
        *MAGPRUNE_PARAMS,
        Param("sign_method", "choice", "sum", "sum: sign of the summed values; count: majority of signs",
              choices=SIGN_METHODS),
        Param("disjoint", "choice", "mean", "mean of the agreeing entries, or their sum", choices=DISJOINT_MODES),
        Param("zero_sign", "choice", "positive", "sign where the sum is exactly 0: + (mergekit) or the model-wide "
              "majority (TIES code)", choices=ZERO_SIGNS),
    ],
    kernel=kernel,
    prepass=prepass,
    after_pass=after_pass,
    check=lambda params, n: magprune_check(params),
    pre_transforms=lambda p: [("magprune", {k: p[k] for k in _MAGPRUNE_KEYS})],
    label="DELLA",
    short_label="DELLA",
    linear_param="scaling",
    in_study=True,
    order=35,
))
