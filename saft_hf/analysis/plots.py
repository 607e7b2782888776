"""Plots of the diagnostics, methods side by side (e.g. AdamW vs ASAM) as in the SAFT paper.

Each function takes `{method: result_json}` (the dicts the diagnostics return / `run_all` writes)
and writes `<stem>.png` and `<stem>.svg` atomically. matplotlib runs headless (Agg).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from saft_hf.io_utils import atomic_path

__all__ = ["plot_planes", "plot_linearity", "plot_hessian", "plot_barriers", "save_figure"]

SEARCH_BOX = (0.1, 1.0)  # the task-arithmetic coefficient search range, drawn on the planes


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem: str | Path, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write `fig` to `<stem>.<fmt>` for each format (temp file, then rename); close it."""
    paths = []
    for fmt in formats:
        path = Path(f"{stem}.{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
        paths.append(path)
    _plt().close(fig)
    return paths


def _grid_of(result: Mapping, quantity: str) -> list[list[float]]:
    if quantity == "joint_loss":
        return result["joint_loss"]
    if quantity.startswith("xi:"):
        return result["xi"][quantity[3:]]
    raise ValueError(f"unknown plane quantity {quantity!r}; use 'joint_loss' or 'xi:<distance>'")


def plot_planes(results: Mapping[str, Mapping], quantity: str, stem: str | Path, title: str = "",
                search_box: tuple[float, float] | None = SEARCH_BOX) -> list[Path]:
    """Heatmaps of one plane quantity ("joint_loss" or "xi:disagreement" ...) per method, one color scale.

    The x axis is a1 (task 1's coefficient), the y axis a2; the coefficient search box is outlined.
    """
    plt = _plt()
    from matplotlib.patches import Rectangle

    methods = list(results)
    grids = {m: _grid_of(results[m], quantity) for m in methods}
    finite = [v for g in grids.values() for row in g for v in row if not math.isnan(v)]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if vmax <= vmin:
        vmax = vmin + 1e-12
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods) + 0.8, 4), squeeze=False)
    image = None
    for col, (ax, m) in enumerate(zip(axes[0], methods)):
        r = results[m]
        a = r["alphas"]
        step = (a[-1] - a[0]) / max(len(a) - 1, 1)
        extent = (a[0] - step / 2, a[-1] + step / 2, a[0] - step / 2, a[-1] + step / 2)
        # grid[i][j] has a1 = a[i], a2 = a[j]; transpose so a1 runs along x
        data = [[grids[m][i][j] for i in range(len(a))] for j in range(len(a))]
        image = ax.imshow(data, origin="lower", extent=extent, vmin=vmin, vmax=vmax, cmap="viridis", aspect="equal")
        if search_box is not None:
            lo, hi = search_box
            ax.add_patch(Rectangle((lo, lo), hi - lo, hi - lo, fill=False, edgecolor="white", linestyle="--", linewidth=1.5))
        t1, t2 = r["tasks"]
        ax.set_xlabel(f"alpha ({t1})")
        if col == 0:
            ax.set_ylabel(f"alpha ({t2})")
        ax.set_title(f"{m} ({r.get('setting', '')})")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label=quantity)
    if title:
        fig.suptitle(title)
    return save_figure(fig, stem)


def plot_linearity(results: Mapping[str, Mapping], stem: str | Path, title: str = "Cross-task linearity") -> list[Path]:
    """Mean CTL deviation per block, one line per method (lower = more linear)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, r in results.items():
        ax.plot(range(1, len(r["mean"]) + 1), r["mean"], marker="o", label=m)
    ax.set_xlabel("block")
    ax.set_ylabel(f"E[1 - cos]  (lambda = {next(iter(results.values()))['lambda']})")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, stem)


def plot_hessian(results: Mapping[str, Mapping], stem: str | Path, title: str = "Top Hessian eigenvalue") -> list[Path]:
    """Top eigenvalue vs gamma along theta0 + gamma tau_t, one panel per task, one line per method."""
    plt = _plt()
    tasks = list(dict.fromkeys(t for r in results.values() for t in r["eigenvalues"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for m, r in results.items():
            if t in r["eigenvalues"]:
                ax.plot(r["gammas"], r["eigenvalues"][t], marker="o", label=m)
        ax.set_title(t)
        ax.set_xlabel("gamma")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top eigenvalue")
    axes[0][0].legend()
    fig.suptitle(title)
    return save_figure(fig, stem)


def plot_barriers(results: Mapping[str, Mapping], stem: str | Path, title: str = "Loss from merged to fine-tuned") -> list[Path]:
    """Loss along the merged -> fine-tuned path per task (solid) with the endpoint interpolation (dashed)."""
    plt = _plt()
    tasks = list(dict.fromkeys(t for r in results.values() for t in r["tasks"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, t in zip(axes[0], tasks):
        for k, (m, r) in enumerate(results.items()):
            if t not in r["tasks"]:
                continue
            c = colors[k % len(colors)]
            rt = r["tasks"][t]
            ax.plot(r["steps"], rt["loss"], color=c, marker=".", label=f"{m} (barrier {rt['barrier']:.3g})")
            ax.plot(r["steps"], rt["interpolation"], color=c, linestyle="--", linewidth=1)
        ax.set_title(t)
        ax.set_xlabel("s  (0 = merged, 1 = fine-tuned)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss")
    fig.suptitle(title)
    return save_figure(fig, stem)
