"""`run_all`: every diagnostic for several fine-tuning methods, numbers as JSON, plots as PNG + SVG.

    from saft_hf.analysis import TaskProbe, run_all
    summary = run_all(probe, pretrained_state_dict,
                      {"AdamW": {"sst2": tau_a, "cola": tau_b}, "ASAM": {...}},
                      "out/analysis")

Files written to `output_dir` (each atomically):
    plane_two-task.json, plane_all-task.json   xi (every distance), per-task and joint loss, accuracy
    disentanglement_<setting>.{png,svg}         xi heatmaps with the coefficient search box
    landscape_<setting>.{png,svg}               joint-task loss heatmaps
    linearity.{json,png,svg}  hessian.{json,png,svg}  barrier.{json,png,svg}
    summary.json                                one scalar per diagnostic and method, plus timings
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from saft_hf.analysis.barrier import loss_barriers
from saft_hf.analysis.disentanglement import _pair
from saft_hf.analysis.grid import WeightSpace, coefficient_grid
from saft_hf.analysis.hessian import hessian_top_eigenvalues
from saft_hf.analysis.linearity import cross_task_linearity
from saft_hf.analysis.plane import DISTANCES, sweep_plane
from saft_hf.analysis.plots import SEARCH_BOX, plot_barriers, plot_hessian, plot_linearity, plot_planes
from saft_hf.analysis.probe import TaskProbe
from saft_hf.io_utils import write_json_atomic

__all__ = ["run_all", "ANALYSES"]

ANALYSES = ("disentanglement", "landscape", "linearity", "hessian", "barrier")

StateDict = Mapping[str, torch.Tensor]


def run_all(
    probe: TaskProbe,
    pretrained: StateDict,
    task_vectors_by_method: Mapping[str, Mapping[str, StateDict]],
    output_dir: str | Path,
    *,
    analyses: Sequence[str] = ANALYSES,
    tasks: Sequence[str] | None = None,
    grid_size: int = 11,
    grid_range: tuple[float, float] = (-0.5, 1.5),
    settings: Sequence[str] = ("two-task", "all-task"),
    others_coefficient: float = 0.3,
    distances: Sequence[str] = DISTANCES,
    ctl_lambda: float = 0.3,
    hessian_gammas: Sequence[float] = (0.0, 0.5, 1.0),
    hessian_max_iter: int = 10,
    hessian_tol: float = 1e-2,
    hessian_tasks: Sequence[str] | None = None,
    barrier_steps: int = 11,
    merge_scaling: float = 0.3,
    merged_by_method: Mapping[str, StateDict] | None = None,
    search_box: tuple[float, float] = SEARCH_BOX,
    progress: bool = True,
) -> dict:
    """Run the chosen diagnostics for each method and write JSON + plots to `output_dir`.

    Args:
        probe: the `TaskProbe` (its subsets fix the data every diagnostic sees).
        pretrained: theta0, the encoder state dict.
        task_vectors_by_method: method name -> {task -> task vector}; e.g. {"AdamW": ..., "ASAM": ...}.
        tasks: the two tasks of the coefficient plane (default: the first two with vectors).
        grid_size / grid_range: the plane grid (paper: 21 over [-0.5, 1.5]; the default 11 suits the demo).
        settings: "two-task" and/or "all-task" (others at `others_coefficient`; skipped with two tasks).
        hessian_tasks: tasks whose Hessian is probed (default all; each costs gammas x iterations HVPs).
        merged_by_method: optional merged encoder per method for the barrier; default task arithmetic
            with `merge_scaling`.
    Returns the summary dict (also written as summary.json). The encoder is left at theta0.
    """
    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {ANALYSES}")
    bad = [s for s in settings if s not in ("two-task", "all-task")]
    if bad:
        raise ValueError(f"unknown plane settings {bad}; use 'two-task' and/or 'all-task'")
    if not task_vectors_by_method:
        raise ValueError("task_vectors_by_method is empty; give at least one method -> {task: task vector}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"methods": list(task_vectors_by_method), "probe": _probe_info(probe), "files": [],
                     "timings_s": {}, "diagnostics": {m: {} for m in task_vectors_by_method}}
    files = summary["files"]

    def timed(name):
        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                summary["timings_s"][name] = summary["timings_s"].get(name, 0.0) + time.perf_counter() - self.t
        return _T()

    if "disentanglement" in analyses or "landscape" in analyses:
        alphas = coefficient_grid(grid_range[0], grid_range[1], grid_size)
        want_xi = "disentanglement" in analyses
        planes = {s: {} for s in settings}
        for method, vectors in task_vectors_by_method.items():
            t1, t2 = _pair(probe, vectors, tasks)
            space = WeightSpace(probe, pretrained, vectors)
            refs = None
            others_all = {t: others_coefficient for t in vectors if t not in (t1, t2)}
            for setting in settings:
                if setting == "all-task" and not others_all:
                    continue  # with only two task vectors the all-task plane equals the two-task plane
                with timed(f"plane_{setting}"):
                    res, refs = sweep_plane(probe, space, (t1, t2), alphas,
                                            others=others_all if setting == "all-task" else {},
                                            distances=distances if want_xi else (), references=refs,
                                            progress=progress, desc=f"{method} plane ({setting})")
                res.setting = setting
                planes[setting][method] = res.to_json()
                inside = _inside_box(alphas, search_box)
                d = summary["diagnostics"][method]
                d[f"joint_loss_in_box_{setting}"] = _mean_over(res.joint_loss, inside)
                for kind in res.xi:
                    d[f"xi_{kind}_in_box_{setting}"] = _mean_over(res.xi[kind], inside)
        for setting, by_method in planes.items():
            if not by_method:
                continue
            path = out / f"plane_{setting}.json"
            write_json_atomic(path, by_method)
            files.append(path.name)
            if want_xi and distances:
                kind = "disagreement" if "disagreement" in distances else distances[0]
                files += _names(plot_planes(by_method, f"xi:{kind}", out / f"disentanglement_{setting}",
                                            title=f"Weight disentanglement error ({kind}, {setting})", search_box=search_box))
            if "landscape" in analyses:
                files += _names(plot_planes(by_method, "joint_loss", out / f"landscape_{setting}",
                                            title=f"Joint-task loss ({setting})", search_box=search_box))

    if "linearity" in analyses:
        ctl = {}
        with timed("linearity"):
            for method, vectors in task_vectors_by_method.items():
                ctl[method] = cross_task_linearity(probe, pretrained, vectors, lam=ctl_lambda, progress=progress)
                summary["diagnostics"][method]["ctl_mean"] = sum(ctl[method]["mean"]) / len(ctl[method]["mean"])
        write_json_atomic(out / "linearity.json", ctl)
        files += ["linearity.json"] + _names(plot_linearity(ctl, out / "linearity"))

    if "hessian" in analyses:
        hess = {}
        with timed("hessian"):
            for method, vectors in task_vectors_by_method.items():
                hess[method] = hessian_top_eigenvalues(probe, pretrained, vectors, gammas=hessian_gammas,
                                                       max_iter=hessian_max_iter, tol=hessian_tol, tasks=hessian_tasks,
                                                       progress=progress)
                eig = [v for vals in hess[method]["eigenvalues"].values() for v in vals]
                summary["diagnostics"][method]["hessian_top_eigenvalue_mean"] = sum(eig) / len(eig)
        write_json_atomic(out / "hessian.json", hess)
        files += ["hessian.json"] + _names(plot_hessian(hess, out / "hessian"))

    if "barrier" in analyses:
        bar = {}
        with timed("barrier"):
            for method, vectors in task_vectors_by_method.items():
                merged = (merged_by_method or {}).get(method)
                bar[method] = loss_barriers(probe, pretrained, vectors, merged=merged, scaling=merge_scaling,
                                            num_steps=barrier_steps, progress=progress)
                vals = [r["barrier"] for r in bar[method]["tasks"].values()]
                summary["diagnostics"][method]["loss_barrier_mean"] = sum(vals) / len(vals)
        write_json_atomic(out / "barrier.json", bar)
        files += ["barrier.json"] + _names(plot_barriers(bar, out / "barrier"))

    write_json_atomic(out / "summary.json", summary)
    return summary


def _probe_info(probe: TaskProbe) -> dict:
    return {"tasks": probe.tasks, "examples": {t: probe.num_examples(t) for t in probe.tasks},
            "blocks": len(probe.block_names),
            "features": probe.features if isinstance(probe.features, str) else getattr(probe.features, "__name__", "custom")}


def _inside_box(alphas: Sequence[float], box: tuple[float, float]) -> list[int]:
    lo, hi = box
    return [i for i, a in enumerate(alphas) if lo - 1e-9 <= a <= hi + 1e-9]


def _mean_over(grid: list[list[float]], idx: list[int]) -> float | None:
    vals = [grid[i][j] for i in idx for j in idx if grid[i][j] == grid[i][j]]
    return sum(vals) / len(vals) if vals else None


def _names(paths) -> list[str]:
    return [Path(p).name for p in paths]
