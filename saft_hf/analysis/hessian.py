"""Top Hessian eigenvalue of a task loss along theta0 + gamma * tau_t (the SAFT paper, Fig. 6).

Power iteration on Hessian-vector products (double backward), one fixed data subset (the probe's),
a fixed-seed start vector and a relative convergence tolerance. HVPs are accumulated batch by batch,
so memory holds one batch's graph at a time. A flatter basin (smaller top eigenvalue) along the
task vector is what sharpness-aware fine-tuning is meant to produce.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from saft_hf.analysis.grid import WeightSpace
from saft_hf.analysis.probe import TaskProbe

__all__ = ["power_iteration", "hessian_top_eigenvalue", "hessian_top_eigenvalues", "probe_hvp"]

Vectors = list[torch.Tensor]
HVP = Callable[[Vectors], Vectors]


def power_iteration(hvp: HVP, like: Sequence[torch.Tensor], max_iter: int = 20, tol: float = 1e-3,
                    seed: int = 0) -> dict:
    """Dominant eigenvalue (largest in magnitude) of the symmetric operator `hvp`.

    `like`: tensors giving the shapes of the vector space. Stops when the Rayleigh quotient changes by
    less than `tol` relative to its size. Returns {"eigenvalue", "iterations", "converged", "history"}.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    gen = torch.Generator().manual_seed(int(seed))
    v = [torch.randn(t.shape, generator=gen, dtype=torch.float32).to(device=t.device, dtype=t.dtype) for t in like]
    _normalize_(v)
    history: list[float] = []
    eig, converged = float("nan"), False
    for _ in range(max_iter):
        hv = hvp(v)
        new = sum((a * b).sum() for a, b in zip(v, hv)).item()  # Rayleigh quotient v.Hv (|v| = 1)
        history.append(new)
        norm = _norm(hv)
        if norm == 0:
            eig, converged = 0.0, True
            break
        if history[:-1] and abs(new - eig) <= tol * max(abs(new), 1e-12):
            eig, converged = new, True
            break
        eig = new
        v = [t / norm for t in hv]
    return {"eigenvalue": eig, "iterations": len(history), "converged": converged, "history": history}


def probe_hvp(probe: TaskProbe, task: str, point: Mapping[str, torch.Tensor]) -> tuple[HVP, Vectors]:
    """A Hessian-vector product of `probe`'s loss on `task` at `point` (parameters only), and the point.

    Each call runs, batch by batch, forward + gradient with graph + a second backward along v,
    weighting batches by size so the result is the HVP of the mean loss.
    """
    keys = [k for k in probe.parameter_keys() if k in point]
    if not keys:
        raise ValueError("the point covers no encoder parameters; pass a state dict with the encoder's parameter keys")
    params = [point[k].detach().clone().float().requires_grad_(True) for k in keys]
    n_total = probe.num_examples(task)

    def hvp(v: Vectors) -> Vectors:
        out = [torch.zeros_like(p) for p in params]
        # the fused CPU/GPU attention kernels have no double backward; the math kernel does
        with sdpa_kernel([SDPBackend.MATH]):
            _accumulate(out, v)
        return out

    def _accumulate(out: Vectors, v: Vectors) -> None:
        for b in range(probe.num_batches(task)):
            loss = probe.batch_loss(task, b, dict(zip(keys, params))) * (probe.batch_size(task, b) / n_total)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            pairs = [(g, u) for g, u in zip(grads, v) if g is not None]
            dot = sum((g * u).sum() for g, u in pairs)
            hv = torch.autograd.grad(dot, params, allow_unused=True)
            for acc, h in zip(out, hv):
                if h is not None:
                    acc += h

    return hvp, params


def hessian_top_eigenvalue(probe: TaskProbe, task: str, point: Mapping[str, torch.Tensor], max_iter: int = 20,
                           tol: float = 1e-3, seed: int = 0) -> dict:
    """Top Hessian eigenvalue of the task loss at `point` (a state dict of encoder weights)."""
    hvp, params = probe_hvp(probe, task, point)
    with torch.enable_grad():
        return power_iteration(hvp, params, max_iter=max_iter, tol=tol, seed=seed)


def hessian_top_eigenvalues(
    probe: TaskProbe,
    pretrained: Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
    gammas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    tasks: Sequence[str] | None = None,
    max_iter: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Top eigenvalue at theta0 + gamma tau_t for each task t and gamma.

    Returns {"gammas", "eigenvalues": {task: [...]}, "iterations": {task: [...]}, "converged": {task: [...]}}.
    """
    tasks = [t for t in (tasks or probe.tasks) if t in task_vectors]
    if not tasks:
        raise ValueError(f"no task has both probe data and a task vector (probe: {probe.tasks}, vectors: {sorted(task_vectors)})")
    space = WeightSpace(probe, pretrained, task_vectors)
    out = {"gammas": [float(g) for g in gammas], "max_iter": max_iter, "tol": tol,
           "eigenvalues": {}, "iterations": {}, "converged": {}}
    bar = tqdm(total=len(tasks) * len(gammas), desc="hessian", disable=not progress, leave=False)
    # The point must include weights the task vectors do not cover (their pretrained values), so start
    # from the encoder's full current state (theta0 after `restore`) and overwrite the covered keys.
    space.restore()
    base = probe.get_weights()
    for t in tasks:
        for key in ("eigenvalues", "iterations", "converged"):
            out[key][t] = []
        for g in gammas:
            point = dict(base)
            point.update(space.state_dict({t: float(g)}))
            res = hessian_top_eigenvalue(probe, t, point, max_iter=max_iter, tol=tol, seed=seed)
            out["eigenvalues"][t].append(res["eigenvalue"])
            out["iterations"][t].append(res["iterations"])
            out["converged"][t].append(res["converged"])
            bar.update()
    bar.close()
    return out


def _norm(vs: Vectors) -> float:
    return torch.sqrt(sum((v.double() ** 2).sum() for v in vs)).item()


def _normalize_(vs: Vectors) -> None:
    n = _norm(vs)
    for v in vs:
        v.div_(n)
