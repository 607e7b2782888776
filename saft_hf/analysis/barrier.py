"""Loss barrier on the straight path from the merged model to each fine-tuned model (SAFT paper, Fig. 7).

theta(s) = (1 - s) theta_merged + s theta_t for s in [0, 1], loss on task t's subset:

    barrier_t = max_s [ L_t(theta(s)) - ((1 - s) L_t(theta_merged) + s L_t(theta_t)) ]

A barrier near zero means the merged model and the fine-tuned model sit in one basin (linear mode
connectivity), so merging loses little of task t. The whole curve is reported too.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from saft_hf.analysis.grid import WeightSpace
from saft_hf.analysis.probe import TaskProbe

__all__ = ["barrier_from_curve", "loss_barrier", "loss_barriers"]

_MERGED = "__merged__"


def barrier_from_curve(steps: Sequence[float], losses: Sequence[float]) -> dict:
    """Barrier of a loss curve sampled at `steps` (first = 0, last = 1, increasing).

    Returns {"barrier", "argmax", "interpolation"}; the barrier is never below 0 because the endpoints
    themselves are on the path (their excess over the interpolation is 0).
    """
    steps = [float(s) for s in steps]
    if len(steps) != len(losses) or len(steps) < 2:
        raise ValueError(f"need at least two (step, loss) pairs of equal count, got {len(steps)} and {len(losses)}")
    if steps[0] != 0.0 or steps[-1] != 1.0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must increase from 0 to 1, got {steps}")
    l0, l1 = float(losses[0]), float(losses[-1])
    interp = [(1 - s) * l0 + s * l1 for s in steps]
    excess = [float(l) - i for l, i in zip(losses, interp)]
    k = max(range(len(excess)), key=excess.__getitem__)
    return {"barrier": max(excess[k], 0.0), "argmax": steps[k], "interpolation": interp}


@torch.no_grad()
def loss_barrier(probe: TaskProbe, space: WeightSpace, task: str, start: Mapping[str, float], end: Mapping[str, float],
                 steps: Sequence[float]) -> dict:
    """Loss of `task` along start -> end (coefficient dicts of `space`) and its barrier."""
    losses = []
    for s in steps:
        coeffs = {k: (1 - s) * start.get(k, 0.0) + s * end.get(k, 0.0) for k in set(start) | set(end)}
        space.move_to(coeffs)
        losses.append(probe.loss(task).item())
    return {"loss": losses, **barrier_from_curve(steps, losses)}


def loss_barriers(
    probe: TaskProbe,
    pretrained: Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
    merged: Mapping[str, torch.Tensor] | None = None,
    scaling: float = 0.3,
    num_steps: int = 11,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Barrier between the merged model and each fine-tuned model theta0 + tau_t.

    `merged`: a merged encoder state dict (any merging method); default task arithmetic
    theta0 + scaling * sum_t tau_t, formed in place. Returns {"steps", "merge", "tasks": {t: {"loss",
    "interpolation", "barrier", "argmax"}}}.
    """
    tasks = [t for t in (tasks or probe.tasks) if t in task_vectors]
    if not tasks:
        raise ValueError(f"no task has both probe data and a task vector (probe: {probe.tasks}, vectors: {sorted(task_vectors)})")
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    steps = [round(s, 9) for s in torch.linspace(0, 1, num_steps, dtype=torch.float64).tolist()]
    directions = dict(task_vectors)
    if merged is not None:
        pre = dict(pretrained)
        directions[_MERGED] = {k: v - pre[k] for k, v in merged.items() if torch.is_floating_point(v) and k in pre}
        start = {_MERGED: 1.0}
        merge_info = {"method": "given"}
    else:
        start = {t: float(scaling) for t in task_vectors}
        merge_info = {"method": "task_arithmetic", "scaling": float(scaling)}
    space = WeightSpace(probe, pretrained, directions)
    out = {"steps": steps, "merge": merge_info, "tasks": {}}
    try:
        for t in tqdm(tasks, desc="loss barrier", disable=not progress, leave=False):
            out["tasks"][t] = loss_barrier(probe, space, t, start, {t: 1.0}, steps)
    finally:
        space.restore()
    return out
