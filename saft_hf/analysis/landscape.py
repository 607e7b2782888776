"""Joint-task loss landscape: L(theta; D1) + L(theta; D2) on the coefficient plane (SAFT paper, Fig. 4).

theta = theta0 + a1 tau1 + a2 tau2 (two-task) or + c * sum of the other task vectors (all-task).
A wide low basin covering the coefficient search box means merging with any coefficients in it works.
This is the same sweep as the disentanglement error; `run_all` computes both from one pass.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from saft_hf.analysis.disentanglement import disentanglement_error
from saft_hf.analysis.plane import PlaneResult
from saft_hf.analysis.probe import TaskProbe

__all__ = ["joint_loss_landscape"]


def joint_loss_landscape(
    probe: TaskProbe,
    pretrained: Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
    tasks: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
    setting: str = "two-task",
    others_coefficient: float = 0.3,
    progress: bool = True,
) -> PlaneResult:
    """Per-task and joint losses on the grid; read `result.joint_loss` (indexed [i][j] = (alphas[i], alphas[j]))."""
    return disentanglement_error(probe, pretrained, task_vectors, tasks=tasks, alphas=alphas, setting=setting,
                                 others_coefficient=others_coefficient, distances=(), progress=progress)
