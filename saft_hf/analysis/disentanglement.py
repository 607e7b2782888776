"""Weight disentanglement error xi(a1, a2) (Ortiz-Jimenez et al. 2023; the SAFT paper, Fig. 3).

xi(a1, a2) = sum_{t in {1,2}} E_{x in D_t}[ dist( f_t(x; theta0 + a1 tau1 + a2 tau2 (+ c sum_others tau)),
                                                f_t(x; theta0 + a_t tau_t) ) ]

Low xi over a wide region means adding one task vector barely changes the other task's predictions:
the task vectors are disentangled, so their sum merges well. "Two-task" uses only tau1 and tau2;
"all-task" also adds every other task vector at a fixed coefficient (0.3 by default).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from saft_hf.analysis.grid import WeightSpace, coefficient_grid
from saft_hf.analysis.plane import DISTANCES, PlaneResult, sweep_plane
from saft_hf.analysis.probe import TaskProbe

__all__ = ["disentanglement_error"]


def disentanglement_error(
    probe: TaskProbe,
    pretrained: Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
    tasks: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
    setting: str = "two-task",
    others_coefficient: float = 0.3,
    distances: Sequence[str] = DISTANCES,
    progress: bool = True,
) -> PlaneResult:
    """xi on the alphas x alphas grid (default 21 points over [-0.5, 1.5]) for tasks (t1, t2).

    `task_vectors`: task name -> task vector (encoder keys); `tasks` defaults to the first two probe
    tasks. `setting="all-task"` adds every other task vector at `others_coefficient`. The result also
    carries per-task losses / accuracies at every point (the joint-task loss landscape for free).
    """
    t1, t2 = _pair(probe, task_vectors, tasks)
    alphas = list(alphas) if alphas is not None else coefficient_grid(-0.5, 1.5, 21)
    if setting not in ("two-task", "all-task"):
        raise ValueError(f"setting must be 'two-task' or 'all-task', got {setting!r}")
    others = {t: others_coefficient for t in task_vectors if t not in (t1, t2)} if setting == "all-task" else {}
    space = WeightSpace(probe, pretrained, task_vectors)
    result, _ = sweep_plane(probe, space, (t1, t2), alphas, others=others, distances=distances,
                            progress=progress, desc=f"disentanglement ({setting})")
    result.setting = setting
    return result


def _pair(probe: TaskProbe, task_vectors: Mapping, tasks: Sequence[str] | None) -> tuple[str, str]:
    if tasks is None:
        tasks = [t for t in probe.tasks if t in task_vectors][:2]
    tasks = list(tasks)
    if len(tasks) != 2:
        raise ValueError(f"need exactly two tasks with data and task vectors, got {tasks}; probe tasks: {probe.tasks}, "
                         f"task vectors: {sorted(task_vectors)}")
    for t in tasks:
        if t not in task_vectors:
            raise KeyError(f"no task vector for task {t!r}; have {sorted(task_vectors)}")
        if t not in probe.tasks:
            raise KeyError(f"the probe has no data for task {t!r}; probe tasks: {probe.tasks}")
    return tasks[0], tasks[1]
