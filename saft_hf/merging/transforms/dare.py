"""DARE (Yu et al. 2024): drop each task-vector entry with probability p and rescale the
survivors (by 1/(1-p), to the original L1 norm per tensor, or not at all). The mask depends only
on (seed + task index, tensor name), so every pass and every row block drops the same entries."""
from __future__ import annotations

from ..grids import PAPER_DROP_RATES
from ..registry import Param, Transform, register_search_alias, register_transform
from ..taskvectors import check_dare_args, dare_tensor


def apply(delta, key: str, task_index: int, params: dict):
    mode = check_dare_args(params["drop_rate"], params["rescale"])
    return dare_tensor(delta, params["drop_rate"], params["seed"] + task_index, key, mode)


register_transform(Transform(
    name="dare",
    description="drop each delta entry with probability drop_rate, rescale the survivors",
    params=[
        Param("drop_rate", "float", None, "probability of dropping an entry (required)", low=0.0, high=1.0,
              high_open=True, grid=PAPER_DROP_RATES, required=True),
        Param("seed", "int", 0, "random seed; task i uses seed + i"),
        Param("rescale", "choice", True, "true/inverse: 1/(1-p); l1: match the L1 norm per tensor; false/none: keep",
              choices=(True, False, "inverse", "l1", "none")),
    ],
    apply=apply,
    label="DARE",
))

# Search names kept for existing callers: the method with DARE in front.
register_search_alias("dare_task_arithmetic", "task_arithmetic", ["dare"])
register_search_alias("dare_ties", "ties", ["dare"])
