"""Cross-task linearity (CTL) per transformer block (Zhou et al. 2024; the SAFT paper, Fig. 5).

For tasks s, t, block l and lambda (0.3 by default):

    dev_l(s, t) = E_{x in D_s u D_t} [ 1 - cos( f_l(x; theta0 + lam (tau_s + tau_t)),
                                               (f_l(x; theta0 + 2 lam tau_s) + f_l(x; theta0 + 2 lam tau_t)) / 2 ) ]

with features flattened per example. 0 means the block's features of the merged model are exactly the
average of the two fine-tuned models' features (the model is linear across tasks there), which is why
task arithmetic works. Lower is better.
"""
from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saft_hf.analysis.grid import WeightSpace
from saft_hf.analysis.probe import TaskProbe

__all__ = ["cross_task_linearity", "linearity_deviation"]


def linearity_deviation(merged: torch.Tensor, single_s: torch.Tensor, single_t: torch.Tensor) -> torch.Tensor:
    """Per-example 1 - cos(merged, (single_s + single_t) / 2), features flattened per example."""
    target = (single_s + single_t) / 2
    return 1 - F.cosine_similarity(merged.flatten(1).double(), target.flatten(1).double(), dim=1, eps=1e-12)


@torch.no_grad()
def cross_task_linearity(
    probe: TaskProbe,
    pretrained: Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
    lam: float = 0.3,
    pairs: Sequence[tuple[str, str]] | None = None,
    progress: bool = True,
) -> dict:
    """CTL deviation per block for every task pair (default: all pairs of tasks with data and vectors).

    Returns `{"lambda", "blocks", "pairs": {"s|t": [dev per block]}, "mean": [mean over pairs per block]}`.
    Work: for each data task d, one pass per single-task point theta0 + 2 lam tau_s and one per pair
    containing d; no pass is repeated.
    """
    tasks = [t for t in probe.tasks if t in task_vectors]
    if pairs is None:
        pairs = list(itertools.combinations(tasks, 2))
    pairs = [tuple(p) for p in pairs]
    if not pairs:
        raise ValueError(f"cross-task linearity needs at least two tasks with data and task vectors; have {tasks}")
    for s, t in pairs:
        for x in (s, t):
            if x not in tasks:
                raise KeyError(f"task {x!r} needs both probe data and a task vector; usable tasks: {tasks}")
    space = WeightSpace(probe, pretrained, task_vectors)
    sums = {p: torch.zeros(len(probe.block_names), dtype=torch.float64) for p in pairs}
    counts = dict.fromkeys(pairs, 0)
    data_tasks = sorted({x for p in pairs for x in p}, key=tasks.index)
    total = sum(len({x for p in pairs if d in p for x in p}) + sum(d in p for p in pairs) for d in data_tasks)
    bar = tqdm(total=total, desc="cross-task linearity", disable=not progress, leave=False)
    try:
        for d in data_tasks:
            my_pairs = [p for p in pairs if d in p]
            singles = {}
            for s in sorted({x for p in my_pairs for x in p}, key=tasks.index):
                space.move_to({s: 2 * lam})
                singles[s] = probe.layer_features(d)
                bar.update()
            for s, t in my_pairs:
                space.move_to({s: lam, t: lam})
                merged = probe.layer_features(d)
                for layer, (m, fs, ft) in enumerate(zip(merged, singles[s], singles[t])):
                    sums[(s, t)][layer] += linearity_deviation(m, fs, ft).sum()
                counts[(s, t)] += probe.num_examples(d)
                bar.update()
        bar.close()
    finally:
        space.restore()
    per_pair = {f"{s}|{t}": (sums[(s, t)] / counts[(s, t)]).tolist() for s, t in pairs}
    mean = torch.stack([torch.tensor(v, dtype=torch.float64) for v in per_pair.values()]).mean(0).tolist()
    return {"lambda": lam, "blocks": list(probe.block_names), "pairs": per_pair, "mean": mean}
