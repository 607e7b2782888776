"""TIES conventions of other tools (trim count, per-model weights / densities, DARE per model)
against definitions written here and against PEFT's `ties` (per tensor) where they coincide."""
from __future__ import annotations

import pytest
import torch

from saft_hf.merging import merge, task_vector, ties_merging
from saft_hf.merging.registry import ParamError
from saft_hf.merging.taskvectors import dare_tensor

SHAPES = {"a.weight": (9, 7), "a.bias": (9,), "b.weight": (4, 5, 3), "c.scalar": (1,)}


def make(num_tasks, seed=0, integer=False):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    tvs = []
    for _ in range(num_tasks):
        tvs.append({k: (torch.randint(-2, 3, s, generator=g).float() if integer else torch.randn(s, generator=g))
                    for k, s in SHAPES.items()})
    return pre, tvs


def exact_trim_naive(x, density, min1):
    """Keep exactly k = int(n*d) (min1: at least 1) largest |x|; ties by lowest index."""
    flat = x.flatten()
    n = flat.numel()
    k = n if density >= 1 else int(density * n)
    k = max(1, k) if min1 else k
    order = sorted(range(n), key=lambda i: (-abs(float(flat[i])), i))[:k]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order] = True
    return (flat * mask).view(x.shape)


def kth_trim_naive(x, density):
    flat = x.flatten()
    r = flat.numel() - int(flat.numel() * density)
    if r < 1:
        return x
    return (flat * (flat.abs() >= flat.abs().kthvalue(r).values)).view(x.shape)


def l1_rescaled(x, trimmed):
    before, after = x.abs().sum(), trimmed.abs().sum()
    return trimmed if before < 1e-7 or after < 1e-7 else trimmed * (before / after)


def mergekit_ties_naive(pre, tvs, weights, densities, normalize=True, lam=1.0, rescale=False):
    """mergekit's ties from its definition, per tensor: exact trim (min 1; with rescale, back to the
    L1 norm), weight, elect the sign of the weighted sum (0 -> +), keep agreeing entries, divide by
    the sum of agreeing weights."""
    out = {}
    for k in SHAPES:
        trimmed = [exact_trim_naive(tv[k], dens, True) for tv, dens in zip(tvs, densities)]
        if rescale:
            trimmed = [l1_rescaled(tv[k], t) for tv, t in zip(tvs, trimmed)]
        d = torch.stack([t * w for t, w in zip(trimmed, weights)])
        elected = torch.where(d.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(d) == elected
        merged = (d * agree).sum(0)
        if normalize:
            div = (torch.tensor(weights).view(-1, *[1] * (d.dim() - 1)) * agree).sum(0)
            div[div == 0] = 1
            merged = merged / div
        out[k] = pre[k] + lam * merged
    return out


def ties_kw(**kw):
    base = dict(trim_scope="per_tensor", trim_count="exact_min1", zero_sign="positive", weighting="mergekit")
    return {**base, **kw}


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
def test_mergekit_conventions_match_definition(integer, normalize, rescale):
    pre, tvs = make(3, seed=1, integer=integer)
    weights, densities = [1.0, 0.5, -0.7], [0.3, 0.6, 0.9]
    got = ties_merging(pre, tvs, scaling=0.8, density=densities, weights=weights,
                       trim_rescale="l1" if rescale else "none", **ties_kw(disjoint="mean" if normalize else "sum"))
    want = mergekit_ties_naive(pre, tvs, weights, densities, normalize, 0.8, rescale)
    for k in SHAPES:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


def test_unit_weights_give_the_unweighted_result():
    pre, tvs = make(3, seed=2)
    plain = ties_merging(pre, tvs, density=0.4, trim_scope="per_tensor", zero_sign="positive")
    weighted = ties_merging(pre, tvs, density=0.4, trim_scope="per_tensor", zero_sign="positive", weights=[1.0] * 3)
    for k in SHAPES:
        torch.testing.assert_close(plain[k], weighted[k], rtol=0, atol=1e-7)


@pytest.mark.parametrize("weighting", ["mergekit", "peft"])
def test_unit_weights_with_the_papers_majority_zero_sign(weighting):
    """Integer deltas: many exact sign ties, resolved by the model-wide majority (deferred blocks);
    unit weights must give the paper's unweighted result through the weighted code path."""
    pre, tvs = make(4, seed=9, integer=True)
    plain = ties_merging(pre, tvs, density=0.5)
    weighted = ties_merging(pre, tvs, density=0.5, weights=[1.0] * 4, weighting=weighting)
    for k in SHAPES:
        torch.testing.assert_close(plain[k], weighted[k], rtol=0, atol=1e-7)
    positive = ties_merging(pre, tvs, density=0.5, zero_sign="positive")
    assert any(not torch.equal(plain[k], positive[k]) for k in SHAPES)  # the majority sign (-) mattered


@pytest.mark.parametrize("sign", [("sum", "total"), ("count", "frequency")])
@pytest.mark.parametrize("density", [0.3, 0.05, 1.0])
@pytest.mark.filterwarnings("ignore:The density 1.0")
def test_peft_conventions_match_peft_ties_per_tensor(sign, density):
    """trim_count exact + weighting peft + zero_sign positive = PEFT's `ties` on each tensor
    (PEFT elects signs on the unweighted pruned tensors and divides by the count of agreeing ones;
    at density 0.05 some tensors keep int(n*d) = 0 entries, as PEFT's topk does)."""
    from peft.utils.merge_utils import ties as peft_ties

    pre, tvs = make(3, seed=3)
    weights = [1.0, 0.4, 0.9]
    got = ties_merging(pre, tvs, density=density, sign_method=sign[0], weights=weights,
                       **ties_kw(trim_count="exact", weighting="peft"))
    for k in SHAPES:
        want = pre[k] + peft_ties([tv[k] for tv in tvs], torch.tensor(weights), density, sign[1])
        assert torch.equal(got[k], want), k  # bit for bit


def test_exact_counts_keep_exactly_k_with_ties_and_kthvalue_keeps_all_ties():
    pre, (tv,) = make(1, seed=4, integer=True)  # values in {-2..2}: runs of equal magnitudes
    for count, min1 in (("exact", False), ("exact_min1", True)):
        out = ties_merging(pre, [tv], density=0.3, **ties_kw(trim_count=count))
        for k in SHAPES:
            kept = out[k] - pre[k]
            torch.testing.assert_close(kept, exact_trim_naive(tv[k], 0.3, min1), rtol=0, atol=1e-6)
            n = tv[k].numel()
            assert int((kept != 0).sum()) <= max(int(0.3 * n), 1 if min1 else 0)
    kth = ties_merging(pre, [tv], density=0.3, trim_scope="per_tensor", zero_sign="positive")
    k = "a.weight"
    torch.testing.assert_close(kth[k] - pre[k], kth_trim_naive(tv[k], 0.3), rtol=0, atol=1e-6)
    assert int((kth[k] != pre[k]).sum()) > int(0.3 * tv[k].numel())  # >= threshold keeps every tie


def test_exact_min1_keeps_one_entry_where_exact_keeps_none():
    pre, (tv,) = make(1, seed=5)
    a = ties_merging(pre, [tv], density=0.05, **ties_kw(trim_count="exact"))
    b = ties_merging(pre, [tv], density=0.05, **ties_kw(trim_count="exact_min1"))
    assert torch.equal(a["a.bias"], pre["a.bias"])  # int(9 * 0.05) = 0
    assert int((b["a.bias"] != pre["a.bias"]).sum()) == 1
    i = tv["a.bias"].abs().argmax()
    assert b["a.bias"][i] == pre["a.bias"][i] + tv["a.bias"][i]


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_per_model_density(scope):
    pre, tvs = make(2, seed=6)
    densities = [0.2, 0.7]
    got = ties_merging(pre, tvs, density=densities, trim_scope=scope, zero_sign="positive", disjoint="sum")
    if scope == "global":
        trimmed = []
        for tv, d in zip(tvs, densities):
            flat = kth_trim_naive(torch.cat([tv[k].flatten() for k in SHAPES]), d)
            parts, i = {}, 0
            for k, s in SHAPES.items():
                n = torch.Size(s).numel()
                parts[k] = flat[i:i + n].view(s)
                i += n
            trimmed.append(parts)
    else:
        trimmed = [{k: kth_trim_naive(tv[k], d) for k in SHAPES} for tv, d in zip(tvs, densities)]
    for k in SHAPES:
        m = torch.stack([t[k] for t in trimmed])
        elected = torch.where(m.sum(0) >= 0, 1.0, -1.0)
        want = pre[k] + (m * (torch.sign(m) == elected)).sum(0)
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-6, msg=k)
    one = ties_merging(pre, tvs, density=0.2, trim_scope=scope, zero_sign="positive", disjoint="sum")
    assert any(not torch.equal(one[k], got[k]) for k in SHAPES)


def test_defaults_unchanged_by_the_new_options():
    pre, tvs = make(3, seed=7)
    a = ties_merging(pre, tvs, scaling=0.5, density=0.3)
    b = merge("ties", pre, tvs, scaling=0.5, density=[0.3, 0.3, 0.3], trim_count="kthvalue")
    for k in SHAPES:
        assert torch.equal(a[k], b[k])


def test_rejections():
    pre, tvs = make(2)
    with pytest.raises(ParamError, match="trim_rescale l1 rescales each tensor after its own trim"):
        ties_merging(pre, tvs, trim_rescale="l1")
    with pytest.raises(ParamError, match="trim_count exact counts entries per tensor"):
        ties_merging(pre, tvs, trim_count="exact")
    with pytest.raises(ParamError, match=r"scaling is lambda, one number.*weights=\[\.\.\.\]"):
        ties_merging(pre, tvs, scaling=[0.3, 0.5])
    with pytest.raises(ParamError, match="ties scaling must be a number"):
        merge("ties", pre, tvs, scaling=[0.3, 0.5])  # (the YAML path: registry message)
    with pytest.raises(ParamError, match="density has 3 values but there are 2 task vectors"):
        ties_merging(pre, tvs, density=[0.1, 0.2, 0.3])
    with pytest.raises(ParamError, match="weights has 1 values"):
        ties_merging(pre, tvs, weights=[1.0])
    with pytest.raises(ParamError, match="trim_count must be one of 'kthvalue' | 'exact' | 'exact_min1', got 'topk'"):
        ties_merging(pre, tvs, trim_count="topk")
    with pytest.raises(ParamError, match="dare drop_rate has 3 values but there are 2 task vectors"):
        merge("task_arithmetic", pre, tvs, transforms=[{"name": "dare", "drop_rate": [0.1, 0.2, 0.3]}])


# -------------------------------------------------------------------------------------------- DARE
def test_dare_per_model_drop_rate():
    pre, tvs = make(2, seed=8)
    out = merge("task_arithmetic", pre, tvs, scaling=[1.0, 0.0],
                transforms=[{"name": "dare", "drop_rate": [0.0, 0.9], "seed": 3}])
    for k in SHAPES:  # task 0 at drop rate 0 is untouched (task 1 has weight 0)
        torch.testing.assert_close(out[k], pre[k] + tvs[0][k], rtol=0, atol=1e-6)
    out = merge("task_arithmetic", pre, tvs, scaling=[0.0, 1.0],
                transforms=[{"name": "dare", "drop_rate": [0.0, 0.5], "seed": 3}])
    for k in SHAPES:  # task 1 uses its own rate and seed 3 + 1
        want = pre[k] + dare_tensor(tvs[1][k], 0.5, 4, k, "inverse")
        torch.testing.assert_close(out[k], want, rtol=0, atol=1e-6)


def test_dare_l1_min_norm_matches_mergekit_rule():
    x = torch.full((100,), 1e-10)
    x[0] = 2e-10
    scaled = dare_tensor(x, 0.5, 0, "k", "l1")
    kept = dare_tensor(x, 0.5, 0, "k", "none")
    assert torch.allclose(scaled.abs().sum(), x.abs().sum())  # min_norm 0: rescaled to the L1 norm
    assert torch.equal(dare_tensor(x, 0.5, 0, "k", "l1", min_norm=1e-7), kept)  # norm < 1e-7: left alone
    y = torch.randn(100)
    assert torch.equal(dare_tensor(y, 0.5, 0, "k", "l1", min_norm=1e-7), dare_tensor(y, 0.5, 0, "k", "l1"))


def test_task_vector_roundtrip_sanity():
    pre, tvs = make(1)
    ft = {k: pre[k] + tvs[0][k] for k in SHAPES}
    tv = task_vector(pre, ft)
    for k in SHAPES:
        torch.testing.assert_close(tv[k], tvs[0][k])
