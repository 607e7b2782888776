"""Model Breadcrumbs and DELLA against naive implementations written from their definitions
(python loops over sorted magnitudes, per-row ranks), the transforms in front of other methods,
and edge cases (tiny tensors, ties, zero task vectors, a single task, bad parameters)."""
from __future__ import annotations

import pytest
import torch

from saft_hf.merging import breadcrumbs, della, merge, registry, task_arithmetic
from saft_hf.merging.taskvectors import key_seed

SHAPES = {"w": (9, 7), "b": (9,), "conv": (3, 2, 4), "s": (1,), "big": (40, 25)}


def models(num_tasks, seed=0, integer=False, zero=()):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    pre["ids"] = torch.arange(3)
    tvs = []
    for t in range(num_tasks):
        tvs.append({k: torch.zeros(s) if t in zero else
                    (torch.randint(-2, 3, s, generator=g).float() if integer else torch.randn(s, generator=g))
                    for k, s in SHAPES.items()})
    return pre, tvs


# ------------------------------------------------------------------ Breadcrumbs
def naive_band(x: torch.Tensor, density: float, beta: float) -> torch.Tensor:
    flat = x.flatten().tolist()
    n = len(flat)
    keep, top = int(density * n), int(beta * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = sorted(range(n), key=lambda i: (abs(flat[i]), i))  # ascending |x|, ties by position
    kept = set(order[bottom:n - top])
    return torch.tensor([v if i in kept else 0.0 for i, v in enumerate(flat)]).view(x.shape)


@pytest.mark.parametrize("density,beta", [(0.1, 0.01), (0.3, 0.05), (0.5, 0.0), (0.9, 0.2), (1.0, 0.0)])
@pytest.mark.parametrize("integer", [False, True])
def test_breadcrumbs_matches_naive(density, beta, integer):
    pre, tvs = models(3, seed=1, integer=integer)
    merged = breadcrumbs(pre, tvs, scaling=[0.5, 1.0, 0.3], density=density, beta=beta)
    for k in SHAPES:
        want = pre[k] + sum(c * naive_band(tv[k], density, beta) for c, tv in zip([0.5, 1.0, 0.3], tvs))
        torch.testing.assert_close(merged[k], want, atol=1e-5, rtol=1e-5, msg=k)
    assert torch.equal(merged["ids"], pre["ids"])


def test_breadcrumbs_counts_and_band():
    """'big' has 1000 entries: density 0.1, beta 0.02 keeps exactly 100, the 20 largest dropped."""
    pre, tvs = models(1, seed=2)
    d = breadcrumbs(pre, tvs, 1.0, density=0.1, beta=0.02)["big"] - pre["big"]
    kept = d != 0
    assert int(kept.sum()) == 100
    mags = tvs[0]["big"].abs().flatten().sort(descending=True).values
    assert d.abs().max() == pytest.approx(float(mags[20]), rel=1e-6)  # rank 21 is the largest kept
    assert d[kept].abs().min() == pytest.approx(float(mags[119]), rel=1e-6)


def test_breadcrumbs_tiny_tensor_keeps_the_top_when_beta_rounds_to_zero():
    """s has one entry: int(beta * 1) = 0 outliers, int(0.9 * 1) = 0 kept -> nothing; with
    density 1.0 the entry is kept (mergekit's `[n_bottom:-0]` would keep nothing)."""
    pre, tvs = models(1, seed=3)
    assert torch.equal(breadcrumbs(pre, tvs, 1.0, density=1.0, beta=0.01)["s"], pre["s"] + tvs[0]["s"])
    w = breadcrumbs(pre, tvs, 1.0, density=0.5, beta=0.01)["w"] - pre["w"]
    assert int((w != 0).sum()) == int(0.5 * 63)  # 0 outliers (int(0.63) = 0), 31 kept


def test_breadcrumbs_density_one_beta_zero_is_task_arithmetic():
    pre, tvs = models(2, seed=4)
    a, b = breadcrumbs(pre, tvs, 0.4, density=1.0, beta=0.0), task_arithmetic(pre, tvs, 0.4)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_breadcrumbs_mask_transform_in_front_of_task_arithmetic_is_the_method():
    pre, tvs = models(2, seed=5)
    a = breadcrumbs(pre, tvs, 0.7, density=0.2, beta=0.05)
    b = merge("task_arithmetic", pre, tvs, transforms=[{"name": "breadcrumbs_mask", "density": 0.2, "beta": 0.05}],
              scaling=0.7)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_breadcrumbs_zero_task_vectors():
    pre, tvs = models(2, seed=6, zero=(0, 1))
    merged = breadcrumbs(pre, tvs, 1.0)
    assert all(torch.equal(merged[k], pre[k]) for k in SHAPES)


# ------------------------------------------------------------------ DELLA
def naive_magprune(x: torch.Tensor, density, epsilon, seed, key, rescale="inverse"):
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    probs = torch.empty(rows.shape, dtype=torch.float64)
    for i, row in enumerate(rows.tolist()):
        n = len(row)
        order = sorted(range(n), key=lambda j: (abs(row[j]), j))  # rank 0 = smallest magnitude
        for rank, j in enumerate(order):
            probs[i, j] = density - epsilon + (2 * epsilon * rank / (n - 1) if n > 1 else epsilon)
    probs = probs.view(x.shape)
    gen = torch.Generator().manual_seed(key_seed(seed, key))  # the documented random stream
    keep = torch.rand(x.shape, generator=gen, dtype=torch.float64) < probs
    if rescale == "inverse":
        return torch.where(keep, x.double() / probs, 0.0)
    return torch.where(keep, x.double(), 0.0)


def naive_elect_mean(deltas):
    """TIES election without trimming, sum exactly 0 -> +, mean of the agreeing non-zero entries."""
    stacked = torch.stack(deltas)
    elected = torch.sign(stacked.sum(0))
    elected[elected == 0] = 1
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("density,epsilon,rescale", [(0.5, 0.1, "inverse"), (0.3, 0.2, "inverse"),
                                                     (0.7, 0.0, "none"), (0.5, 0.1, "none")])
def test_della_matches_naive(density, epsilon, rescale):
    pre, tvs = models(3, seed=7)
    merged = della(pre, tvs, scaling=0.8, density=density, epsilon=epsilon, seed=11, rescale=rescale)
    for k in SHAPES:
        pruned = [naive_magprune(tv[k], density, epsilon, 11 + i, k, rescale) for i, tv in enumerate(tvs)]
        want = pre[k].double() + 0.8 * naive_elect_mean(pruned)
        torch.testing.assert_close(merged[k].double(), want, atol=1e-5, rtol=1e-5, msg=k)


def test_della_keep_rate_follows_magnitude_rank():
    """Over many rows, large entries survive more often than small ones, about density overall."""
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.zeros(400, 50)}
    tv = {"w": torch.randn(400, 50, generator=g)}
    d = della(pre, [tv], 1.0, density=0.5, epsilon=0.3, rescale="none")["w"]
    kept = d != 0
    ranks = tv["w"].abs().argsort(1).argsort(1)
    low, high = kept[ranks < 10].float().mean(), kept[ranks >= 40].float().mean()
    assert abs(kept.float().mean() - 0.5) < 0.02
    assert 0.17 < low < 0.29 and 0.71 < high < 0.83  # expected 0.23 and 0.77


def test_della_is_magprune_in_front_of_ties_without_trim():
    pre, tvs = models(3, seed=8, integer=True)
    spec = {"name": "magprune", "density": 0.6, "epsilon": 0.2, "seed": 3}
    for zero_sign in ("positive", "majority"):
        a = della(pre, tvs, 0.9, density=0.6, epsilon=0.2, seed=3, zero_sign=zero_sign)
        b = merge("ties", pre, tvs, transforms=[spec], scaling=0.9, density=1.0, zero_sign=zero_sign)
        assert all(torch.equal(a[k], b[k]) for k in a), zero_sign


def test_della_single_task_density_one_is_the_task_vector():
    pre, tvs = models(1, seed=9)
    merged = della(pre, tvs, 1.0, density=1.0, epsilon=0.0)
    assert all(torch.equal(merged[k], pre[k] + tvs[0][k]) for k in SHAPES)


def test_della_zero_task_vectors():
    pre, tvs = models(2, seed=10, zero=(0, 1))
    merged = della(pre, tvs)
    assert all(torch.equal(merged[k], pre[k]) for k in SHAPES)


def test_della_same_seed_same_result_other_seed_differs():
    pre, tvs = models(2, seed=12)
    a, b, c = della(pre, tvs, seed=1), della(pre, tvs, seed=1), della(pre, tvs, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["big"], c["big"])


@pytest.mark.parametrize("params,message", [
    ({"density": 0.05, "epsilon": 0.1}, "0 < density - epsilon"),
    ({"density": 0.95, "epsilon": 0.1}, "density \\+ epsilon <= 1"),
    ({"rescale": "l2"}, "rescale must be one of"),
])
def test_della_rejects_bad_probabilities(params, message):
    pre, tvs = models(2)
    with pytest.raises(registry.ParamError, match=message):
        merge("della", pre, tvs, **params)
    if "rescale" not in params:
        with pytest.raises(registry.ParamError, match=message):
            merge("ties", pre, tvs, transforms=[{"name": "magprune", **params}])


def test_sparsify_methods_declared_for_search_and_studies():
    assert registry.get_method("breadcrumbs").grid() == {"scaling": [0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
                                                         "density": [0.1, 0.2, 0.3]}
    assert registry.get_method("della").grid() == {"scaling": [0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
                                                   "density": [0.3, 0.5, 0.7]}
    assert {"breadcrumbs_mask", "magprune"} <= set(registry.transform_names())
