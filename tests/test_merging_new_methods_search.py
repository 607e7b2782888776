"""Coefficient search over the declared grids of every method of issue 13: every grid point is
scored, the direction cache along the linear parameter gives exactly the direct merge, and the
search's best config merges to the same weights."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from saft_hf.merging import merge, registry, search_coefficients
from saft_hf.merging.search import default_grid

SHAPES = {"w": (8, 6), "v": (6, 8), "b": (8,)}
NEW = ["tsv_merging", "iso_c", "iso_cts", "breadcrumbs", "della", "model_stock", "slerp"]


def models(num, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    common = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    tvs = [{k: 0.1 * (common[k] + torch.randn(s, generator=g)) for k, s in SHAPES.items()} for _ in range(num)]
    return pre, tvs


@pytest.mark.parametrize("method", NEW)
def test_search_scores_every_declared_grid_point_and_best_equals_direct_merge(method):
    num = 2 if method == "slerp" else 3
    pre, tvs = models(num, seed=NEW.index(method))
    target = {k: pre[k] + 0.5 * sum(tv[k] for tv in tvs) for k in SHAPES}
    seen = []

    def evaluate(sd):
        seen.append({k: sd[k].clone() for k in SHAPES})
        return {"task": -math.sqrt(sum(float((sd[k] - target[k]).pow(2).sum()) for k in SHAPES))}

    res = search_coefficients(pre, tvs, evaluate, method=method, progress=False)
    grid = default_grid(method)
    assert grid == registry.get_method(method).grid()
    assert len(res.points) == (math.prod(len(v) for v in grid.values()) if grid else 1)
    assert {tuple(sorted(p.params.items())) for p in res.points} == \
        {tuple(sorted(zip(grid, combo))) for combo in itertools.product(*grid.values())}
    best = res.best_merge_config()
    direct = merge(best["method"], pre, tvs, best["transforms"], **best["params"])
    i = res.points.index(res.best)
    for k in SHAPES:
        torch.testing.assert_close(seen[i][k], direct[k], atol=2e-6, rtol=2e-6, msg=k)


def test_every_new_method_is_a_study_method_with_labels():
    rows = {r.method: r for r in registry.study_rows(num_tasks=2)}
    for name in NEW:
        assert name in rows, name
        m = registry.get_method(name)
        assert rows[name].search == bool(m.grid())
        assert m.description and m.short_label
    assert rows["iso_c"].label == "Iso-C (alpha searched)" and rows["model_stock"].label == "Model Stock"
