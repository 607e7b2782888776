"""One sweep over the coefficient plane theta0 (+ offset) + a1 tau1 + a2 tau2 that feeds two diagnostics.

At each grid point both tasks' subsets go through the model once; from those logits we take the
task losses and accuracies (joint-task loss landscape) and the distance to the reference predictions
f_t(x; theta0 + a_t tau_t) (weight disentanglement error). The references depend only on a_t, so they
are computed once per axis value before the sweep (2 x grid_size passes, not 2 x grid_size^2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saft_hf.analysis.grid import WeightSpace
from saft_hf.analysis.probe import TaskProbe

__all__ = ["DISTANCES", "PlaneResult", "PlaneSweep", "sweep_plane", "compute_references", "prediction_distance"]

DISTANCES = ("disagreement", "kl", "l2")


def prediction_distance(logits: torch.Tensor, reference: torch.Tensor, kind: str = "disagreement") -> float:
    """Mean over examples of dist(f(x), f_ref(x)).

    "disagreement": fraction of examples whose predicted class differs; "kl": KL(ref || current) of the
    softmax outputs; "l2": Euclidean distance between logit vectors.
    """
    if logits.shape != reference.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and reference {tuple(reference.shape)} differ in shape")
    if kind == "disagreement":
        return (logits.argmax(-1) != reference.argmax(-1)).float().mean().item()
    if kind == "kl":
        ref_logp = F.log_softmax(reference.float(), -1)
        cur_logp = F.log_softmax(logits.float(), -1)
        return (ref_logp.exp() * (ref_logp - cur_logp)).sum(-1).mean().item()
    if kind == "l2":
        return (logits.float() - reference.float()).norm(dim=-1).mean().item()
    raise ValueError(f"unknown distance {kind!r}; choose one of {DISTANCES}")


@dataclass
class PlaneResult:
    """Numbers of one plane sweep; every grid is indexed [i][j] with a1 = alphas[i], a2 = alphas[j]."""

    setting: str
    tasks: tuple[str, str]
    alphas: list[float]
    others: dict[str, float]
    xi: dict[str, list[list[float]]] = field(default_factory=dict)          # distance kind -> grid
    loss: dict[str, list[list[float]]] = field(default_factory=dict)        # task -> grid
    accuracy: dict[str, list[list[float]]] = field(default_factory=dict)    # task -> grid

    @property
    def joint_loss(self) -> list[list[float]]:
        t1, t2 = self.tasks
        return [[a + b for a, b in zip(r1, r2)] for r1, r2 in zip(self.loss[t1], self.loss[t2])]

    def to_json(self) -> dict:
        return {
            "setting": self.setting, "tasks": list(self.tasks), "alphas": self.alphas, "others": self.others,
            "xi": self.xi, "loss": self.loss, "joint_loss": self.joint_loss, "accuracy": self.accuracy,
        }


class PlaneSweep:
    """The per-point work of a plane sweep, exposed so benchmarks can time exactly one grid point.

    Call `begin()` once (folds the fixed offset into the base point), then `evaluate(i, j)` per cell
    in `order()`, then `end()` (puts theta0 back). In the two-task setting with 0 on the grid, the
    references come free: f_1(x; theta0 + a1 tau1) *is* task 1's output at cell (a1, 0), so the
    row / column through 0 is evaluated first and its outputs are kept as the references.
    """

    def __init__(self, probe: TaskProbe, space: WeightSpace, tasks: Sequence[str], alphas: Sequence[float],
                 others: Mapping[str, float] | None = None, distances: Sequence[str] = DISTANCES,
                 references: Mapping[str, Sequence[torch.Tensor]] | None = None):
        t1, t2 = tasks
        for kind in distances:
            if kind not in DISTANCES:
                raise ValueError(f"unknown distance {kind!r}; choose from {DISTANCES}")
        self.probe, self.space, self.tasks = probe, space, (t1, t2)
        self.alphas = [float(a) for a in alphas]
        self.others = {k: float(v) for k, v in (others or {}).items() if k not in (t1, t2) and v}
        self.distances = tuple(distances)
        n = len(self.alphas)
        self.references: dict[str, list[torch.Tensor | None]] = {
            t: list(references[t]) if references and t in references else [None] * n for t in (t1, t2)}
        zero = [k for k, a in enumerate(self.alphas) if a == 0.0]
        # free references need the unshifted plane (no offset) and a grid point at 0
        self._zero = zero[0] if (zero and not self.others) else None
        nan = float("nan")
        self.result = PlaneResult(
            setting="all-task" if self.others else "two-task", tasks=(t1, t2), alphas=self.alphas, others=self.others,
            xi={k: [[nan] * n for _ in range(n)] for k in self.distances},
            loss={t: [[nan] * n for _ in range(n)] for t in (t1, t2)},
            accuracy={t: [[nan] * n for _ in range(n)] for t in (t1, t2)},
        )
        self._labels = {t: probe.labels(t) for t in (t1, t2)}

    def missing_references(self, cells: Sequence[tuple[int, int]]) -> bool:
        """Whether some cell needs a reference that neither exists nor comes free from the sweep.

        Free: cell (i, 0) yields task 1's reference at alphas[i], cell (0, j) task 2's at alphas[j];
        `order` evaluates those cells before any cell that needs them.
        """
        if not self.distances:
            return False
        t1, t2 = self.tasks
        need = {(t1, i) for i, _ in cells} | {(t2, j) for _, j in cells}
        have = {(t, k) for t in self.tasks for k, r in enumerate(self.references[t]) if r is not None}
        z = self._zero
        if z is not None:
            have |= {(t1, i) for i, j in cells if j == z} | {(t2, j) for i, j in cells if i == z}
        return bool(need - have)

    def order(self, cells: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Cells with (0, 0) first, then the axes through 0, then the rest (row-major)."""
        z = self._zero
        if z is None:
            return list(cells)
        rank = lambda c: (0 if c == (z, z) else 1 if z in c else 2, c)  # noqa: E731
        return sorted(cells, key=rank)

    def begin(self) -> None:
        self.space.set_offset(self.others)

    def end(self) -> None:
        self.space.restore()

    def evaluate(self, i: int, j: int) -> None:
        """Move to (alphas[i], alphas[j]) in place, run both tasks once, record every number."""
        t1, t2 = self.tasks
        res, z = self.result, self._zero
        self.space.move_to({t1: self.alphas[i], t2: self.alphas[j]})
        xi = dict.fromkeys(self.distances, 0.0)
        for t, k, on_axis in ((t1, i, j == z), (t2, j, i == z)):
            logits = self.probe.logits(t)
            labels = self._labels[t]
            res.loss[t][i][j] = F.cross_entropy(logits, labels).item()
            res.accuracy[t][i][j] = (logits.argmax(-1) == labels).float().mean().item()
            if not self.distances:
                continue
            if on_axis and self.references[t][k] is None:
                self.references[t][k] = logits  # this cell is theta0 + a_t tau_t exactly
            ref = self.references[t][k]
            if ref is None:
                raise RuntimeError(f"no reference for task {t!r} at alpha {self.alphas[k]}; compute references first")
            for kind in self.distances:
                xi[kind] += prediction_distance(logits, ref, kind)
        for kind in self.distances:
            res.xi[kind][i][j] = xi[kind]


@torch.no_grad()
def sweep_plane(
    probe: TaskProbe,
    space: WeightSpace,
    tasks: Sequence[str],
    alphas: Sequence[float],
    others: Mapping[str, float] | None = None,
    distances: Sequence[str] = DISTANCES,
    references: Mapping[str, Sequence[torch.Tensor]] | None = None,
    points: Sequence[tuple[int, int]] | None = None,
    progress: bool = True,
    desc: str = "plane",
) -> tuple[PlaneResult, dict[str, list[torch.Tensor]]]:
    """Evaluate both tasks at every point of the alphas x alphas grid: 2 forward passes per point.

    `tasks` = (t1, t2) name both the task data and the directions of `space`; `others` maps further
    directions to fixed coefficients (all-task setting: every other task at 0.3). `references` (as
    returned by a previous call) are reused; missing ones come free from the sweep (two-task setting
    with 0 on the grid) or are computed first (2 x len(alphas) passes). `points` restricts the sweep
    to some (i, j) index pairs; unswept cells are NaN. Returns the result and the references.
    The encoder is left at theta0.
    """
    sweep = PlaneSweep(probe, space, tasks, alphas, others=others, distances=distances, references=references)
    n = len(sweep.alphas)
    cells = list(points) if points is not None else [(i, j) for i in range(n) for j in range(n)]
    if sweep.missing_references(cells):
        refs = compute_references(probe, space, sweep.tasks, sweep.alphas, progress=progress)
        sweep.references = {t: [r if r is not None else refs[t][k] for k, r in enumerate(sweep.references[t])]
                            for t in sweep.tasks}
    sweep.begin()
    try:
        for i, j in tqdm(sweep.order(cells), desc=desc, disable=not progress, leave=False):
            sweep.evaluate(i, j)
    finally:
        sweep.end()
    refs_out = {t: list(r) for t, r in sweep.references.items()} if all(
        r is not None for rs in sweep.references.values() for r in rs) else {}
    return sweep.result, refs_out


@torch.no_grad()
def compute_references(probe: TaskProbe, space: WeightSpace, tasks: Sequence[str], alphas: Sequence[float],
                       progress: bool = True) -> dict[str, list[torch.Tensor]]:
    """f_t(x; theta0 + a tau_t) for each task t and each a in alphas: one pass per (t, a)."""
    refs: dict[str, list[torch.Tensor]] = {}
    space.set_offset({})
    try:
        bar = tqdm(total=len(tasks) * len(alphas), desc="references", disable=not progress, leave=False)
        for t in tasks:
            refs[t] = []
            for a in alphas:
                space.move_to({t: float(a)})
                refs[t].append(probe.logits(t).clone())
                bar.update()
        bar.close()
    finally:
        space.restore()
    return refs
