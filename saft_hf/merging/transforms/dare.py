"""DARE (Yu et al. 2024): drop each task-vector entry with probability p and rescale the
survivors (by 1/(1-p), to the original L1 norm per tensor, or not at all). The mask depends only
on (seed + task index, tensor name), so every pass and every row block drops the same entries."""
from __future__ import annotations

from ..grids import PAPER_DROP_RATES
from ..registry import Param, Transform, register_search_alias, register_transform
from ..taskvectors import check_dare_args, dare_tensor


def apply(delta, key: str, task_index: int, params: dict):
    rate = params["drop_rate"]
    if isinstance(rate, (list, tuple)):  # one drop rate per task (mergekit: 1 - each model's density)
        rate = rate[task_index]
    mode = check_dare_args(rate, params["rescale"])
    return dare_tensor(delta, rate, params["seed"] + task_index, key, mode, params["min_norm"])


register_transform(Transform(
    name="dare",
    description="drop each delta entry with probability drop_rate, rescale the survivors",
    params=[
        Param("drop_rate", "per_task_float", None, "probability of dropping an entry (required); one number, "
              "or a list with one per model", low=0.0, high=1.0, high_open=True, grid=PAPER_DROP_RATES, required=True),
        Param("seed", "int", 0, "random seed; task i uses seed + i"),
        Param("rescale", "choice", True, "true/inverse: 1/(1-p); l1: match the L1 norm per tensor; false/none: keep",
              choices=(True, False, "inverse", "l1", "none")),
        Param("min_norm", "float", 0.0, "l1 rescale: leave a tensor unscaled if its L1 norm before or after the "
              "drop is below this (0: whenever survivors remain; mergekit: 1e-7)", low=0.0),
    ],
    apply=apply,
    label="DARE",
))

# Search names kept for existing callers: the method with DARE in front.
register_search_alias("dare_task_arithmetic", "task_arithmetic", ["dare"])
register_search_alias("dare_ties", "ties", ["dare"])
