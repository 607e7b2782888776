"""Weighted average of the fine-tuned models: sum_t w_t theta_t (uniform 1/T by default)."""
from __future__ import annotations

from ..engine import per_task
from ..registry import MergeMethod, Param, ParamError, register_method
from .task_arithmetic import weighted_sum


def _weights(params: dict, num_tasks: int) -> list[float]:
    w = per_task(params.get("weights", 1.0), num_tasks, "weights")
    if params.get("normalize", True):
        total = sum(w)
        w = [x / total for x in w]
    return w


def check(params: dict, num_tasks: int | None) -> None:
    w = params.get("weights")
    if params.get("normalize", True) and w is not None and sum(w if isinstance(w, list) else [w]) == 0:
        raise ParamError("weighted_average weights sum to 0, so they cannot be normalized; "
                         "give weights with a non-zero sum or set normalize: false")


def prepass(ctx) -> None:
    ctx.state["weights"] = _weights(ctx.params, ctx.num_tasks)


def kernel(deltas, ctx):
    # sum_t w_t theta_t = (sum_t w_t) theta_0 + sum_t w_t (theta_t - theta_0)
    return weighted_sum(deltas, ctx.state["weights"])


register_method(MergeMethod(
    name="weighted_average",
    description="sum_t w_t theta_t of the fine-tuned models (uniform 1/T unless weights are given)",
    params=[Param("weights", "per_task_float", None, "one weight per model (omit for uniform 1/T)"),
            Param("normalize", "bool", True, "divide the weights by their sum")],
    kernel=kernel,
    prepass=prepass,
    base_scale=lambda ctx: sum(ctx.state["weights"]),
    check=check,
    label="weighted average",
    short_label="WA",
    needs_pretrained=False,
    takes_task_vectors=False,
    in_study=True,
    order=10,
    coefficient=lambda params, n: params["weights"] if "weights" in params else 1.0 / n,
))
