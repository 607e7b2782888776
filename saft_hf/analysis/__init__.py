"""The SAFT paper's diagnostics as a toolkit: why does a fine-tuning method merge well?

* `TaskProbe` (probe.py): encoder + frozen task heads + fixed evaluation subsets.
* `disentanglement_error` - weight disentanglement error xi(a1, a2) on a coefficient grid.
* `cross_task_linearity` - per-block cross-task linearity deviation.
* `joint_loss_landscape` - L(theta; D1) + L(theta; D2) on the same grid.
* `hessian_top_eigenvalues` - top Hessian eigenvalue along theta0 + gamma * tau_t.
* `loss_barriers` - loss barrier on the path from the merged model to each fine-tuned model.
* `run_all` - every diagnostic for several fine-tuning methods, JSON + PNG/SVG plots.

Names are imported lazily so `import saft_hf.analysis` stays cheap.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "TaskProbe": "saft_hf.analysis.probe",
    "find_transformer_blocks": "saft_hf.analysis.probe",
    "fixed_subset_indices": "saft_hf.analysis.probe",
    "WeightSpace": "saft_hf.analysis.grid",
    "coefficient_grid": "saft_hf.analysis.grid",
    "disentanglement_error": "saft_hf.analysis.disentanglement",
    "cross_task_linearity": "saft_hf.analysis.linearity",
    "joint_loss_landscape": "saft_hf.analysis.landscape",
    "hessian_top_eigenvalue": "saft_hf.analysis.hessian",
    "hessian_top_eigenvalues": "saft_hf.analysis.hessian",
    "power_iteration": "saft_hf.analysis.hessian",
    "loss_barrier": "saft_hf.analysis.barrier",
    "loss_barriers": "saft_hf.analysis.barrier",
    "run_all": "saft_hf.analysis.run",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saft_hf.analysis' has no attribute {name!r}")
