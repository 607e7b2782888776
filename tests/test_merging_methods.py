"""Merging maths against naive implementations written from the definitions, PEFT's `ties`,
property tests, and the exact streaming threshold against flattened kthvalue."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saft_hf.merging import dare, exact_kth_abs, task_arithmetic, task_vector, ties_merging, weighted_average
from saft_hf.merging.search import search_coefficients

SHAPES = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (3, 4, 2), "c.scalar": (1,), "d.weight": (11, 3)}


def make_models(num_tasks, seed=0, integer=False):
    """Pretrained + fine-tuned state dicts; integer=True gives many exact ties, zeros and zero sums."""
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    pre["pos_ids"] = torch.arange(4)  # integer buffer: never merged
    fts = []
    for _ in range(num_tasks):
        ft = {}
        for k, s in SHAPES.items():
            delta = torch.randint(-2, 3, s, generator=g).float() if integer else torch.randn(s, generator=g)
            ft[k] = pre[k] + delta
        ft["pos_ids"] = pre["pos_ids"].clone()
        fts.append(ft)
    return pre, fts


# ---------------------------------------------------------------- naive reference implementations
def naive_tvs(pre, fts):
    return [{k: ft[k] - pre[k] for k in SHAPES} for ft in fts]


def naive_trim(tv, density, scope):
    def trim(flat):
        k = flat.numel() - int(flat.numel() * density)
        if k < 1:
            return flat
        kth = flat.abs().kthvalue(k).values
        return flat * (flat.abs() >= kth)

    if scope == "global":
        flat = trim(torch.cat([tv[k].flatten() for k in SHAPES]))
        return flat
    return torch.cat([trim(tv[k].flatten()) for k in SHAPES])


def naive_ties(pre, tvs, scaling, density, scope, sign_method, disjoint):
    M = torch.stack([naive_trim(tv, density, scope) for tv in tvs])  # T x P
    elected = torch.sign(M.sum(0)) if sign_method == "sum" else torch.sign(torch.sign(M).sum(0))
    majority = torch.sign(elected.sum())
    elected[elected == 0] = majority if majority != 0 else 1
    keep = torch.where(elected > 0, M > 0, M < 0)
    sel = M * keep
    merged = sel.sum(0)
    if disjoint == "mean":
        merged = merged / (sel != 0).sum(0).clamp(min=1)
    out, i = {}, 0
    for k, s in SHAPES.items():
        n = torch.Size(s).numel()
        out[k] = pre[k] + scaling * merged[i:i + n].reshape(s)
        i += n
    out["pos_ids"] = pre["pos_ids"]
    return out


def assert_sd_close(a, b, atol=1e-5):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


# ---------------------------------------------------------------- methods vs naive
def test_task_vector_matches_definition_and_skips_integer_buffers():
    pre, (ft,) = make_models(1)
    tv = task_vector(pre, ft)
    assert "pos_ids" not in tv
    for k in SHAPES:
        assert torch.equal(tv[k], ft[k] - pre[k])


def test_task_vector_errors_name_the_key():
    pre, (ft,) = make_models(1)
    bad = dict(ft)
    del bad["b.weight"]
    with pytest.raises(Exception, match="b.weight"):
        task_vector(pre, bad)
    bad = dict(ft, **{"a.bias": torch.zeros(8)})
    with pytest.raises(Exception, match="a.bias"):
        task_vector(pre, bad)
    bad = dict(ft, **{"a.bias": ft["a.bias"].half()})
    with pytest.raises(Exception, match="dtype mismatch for 'a.bias'"):
        task_vector(pre, bad)


@pytest.mark.parametrize("scaling", [0.3, [0.2, 0.5, 1.0]])
def test_task_arithmetic_matches_definition(scaling):
    pre, fts = make_models(3, seed=1)
    tvs = naive_tvs(pre, fts)
    alphas = scaling if isinstance(scaling, list) else [scaling] * 3
    expect = {k: pre[k] + sum(a * tv[k] for a, tv in zip(alphas, tvs)) for k in SHAPES}
    expect["pos_ids"] = pre["pos_ids"]
    assert_sd_close(task_arithmetic(pre, [task_vector(pre, ft) for ft in fts], scaling=scaling), expect)


def test_task_arithmetic_scaling_count_mismatch_is_an_error():
    pre, fts = make_models(2)
    with pytest.raises(ValueError, match="one per task"):
        task_arithmetic(pre, [task_vector(pre, f) for f in fts], scaling=[0.1, 0.2, 0.3])


def test_weighted_average_matches_definition():
    _, fts = make_models(3, seed=2)
    w = [0.2, 0.3, 0.5]
    expect = {k: sum(wi * ft[k] for wi, ft in zip(w, fts)) for k in SHAPES}
    expect["pos_ids"] = fts[0]["pos_ids"]
    assert_sd_close(weighted_average(fts, weights=w), expect)
    uniform = {k: sum(ft[k] for ft in fts) / 3 for k in SHAPES}
    uniform["pos_ids"] = fts[0]["pos_ids"]
    assert_sd_close(weighted_average(fts), uniform)


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("sign_method", ["sum", "count"])
@pytest.mark.parametrize("disjoint", ["mean", "sum"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_naive(integer, scope, sign_method, disjoint, density):
    pre, fts = make_models(4, seed=3, integer=integer)
    tvs = [task_vector(pre, ft) for ft in fts]
    got = ties_merging(pre, tvs, scaling=0.7, density=density, trim_scope=scope, sign_method=sign_method, disjoint=disjoint)
    expect = naive_ties(pre, naive_tvs(pre, fts), 0.7, density, scope, sign_method, disjoint)
    assert_sd_close(got, expect)


def test_ties_zero_sign_majority_is_exercised_and_matches_naive():
    # Two tasks with opposite deltas on some entries: the summed sign is 0 where both survive trimming.
    pre = {"w": torch.zeros(6)}
    t1 = {"w": torch.tensor([3.0, -3.0, 1.0, 2.0, 2.0, 0.0])}
    t2 = {"w": torch.tensor([-3.0, 3.0, 1.0, 2.0, -1.0, 0.0])}
    got = ties_merging(pre, [t1, t2], scaling=1.0, density=1.0)
    # elected signs before resolution: [0, 0, +, +, +, 0] -> majority + -> entries 0 and 1 keep the positive value.
    torch.testing.assert_close(got["w"], torch.tensor([3.0, 3.0, 1.0, 2.0, 2.0, 0.0]))
    neg = ties_merging(pre, [{"w": -t1["w"]}, {"w": -t2["w"]}], scaling=1.0, density=1.0)
    torch.testing.assert_close(neg["w"], torch.tensor([-3.0, -3.0, -1.0, -2.0, -2.0, 0.0]))
    pos = ties_merging(pre, [{"w": -t1["w"]}, {"w": -t2["w"]}], scaling=1.0, density=1.0, zero_sign="positive")
    torch.testing.assert_close(pos["w"], torch.tensor([3.0, 3.0, -1.0, -2.0, -2.0, 0.0]))


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_ties_rejects_density_outside_unit_interval(density):
    pre, fts = make_models(2)
    with pytest.raises(ValueError, match="density must be in \\(0, 1\\]"):
        ties_merging(pre, [task_vector(pre, f) for f in fts], density=density)


def test_ties_rejects_unknown_options():
    pre, fts = make_models(1)
    with pytest.raises(ValueError, match="sign_method"):
        ties_merging(pre, [task_vector(pre, fts[0])], sign_method="vote")


@pytest.mark.parametrize("sign_method,peft_method", [("sum", "total"), ("count", "frequency")])
@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_ties_per_tensor_agrees_with_peft(sign_method, peft_method, weight):
    """Where the definitions coincide: per-tensor trim, continuous values (no magnitude ties, so
    PEFT's topk and our >= threshold keep the same entries; no zero sums, so the tie rule is moot),
    one shared weight (PEFT multiplies by the weights after electing; we scale the merged delta).
    One documented difference: the TIES reference (and we) keep |x| >= kthvalue(n - int(n*density)),
    i.e. int(n*density) + 1 entries; PEFT keeps exactly int(n*density). So PEFT gets one more."""
    from peft.utils.merge_utils import ties as peft_ties

    g = torch.Generator().manual_seed(5)
    shapes = [(40, 30), (64,), (10, 10, 3)]
    pre = {f"k{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    tvs = [{k: torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    for density in (0.1, 0.2, 0.5):
        ours = ties_merging(pre, tvs, scaling=weight, density=density, trim_scope="per_tensor",
                            sign_method=sign_method, zero_sign="positive")
        for k in pre:
            n = pre[k].numel()
            peft_density = (int(n * density) + 1.5) / n  # int(n * peft_density) == int(n * density) + 1
            theirs = peft_ties([tv[k] for tv in tvs], torch.full((3,), weight), peft_density,
                               majority_sign_method=peft_method)
            torch.testing.assert_close(ours[k] - pre[k], theirs, atol=1e-5, rtol=1e-5)


def test_dare_drops_and_rescales():
    g = torch.Generator().manual_seed(0)
    tv = {"w": torch.randn(200, 100, generator=g), "ids": torch.arange(3)}
    out = dare(tv, drop_rate=0.3, seed=1)
    kept = out["w"] != 0
    assert 0.6 < kept.float().mean() < 0.8
    torch.testing.assert_close(out["w"][kept], tv["w"][kept] / 0.7)
    assert torch.equal(out["ids"], tv["ids"])
    assert torch.equal(dare(tv, 0.3, seed=1)["w"], out["w"])  # deterministic per (seed, key)
    assert not torch.equal(dare(tv, 0.3, seed=2)["w"], out["w"])
    l1 = dare(tv, 0.3, seed=1, rescale="l1")["w"]
    torch.testing.assert_close(l1.abs().sum(), tv["w"].abs().sum())
    assert torch.equal(dare(tv, 0.3, seed=1, rescale=False)["w"][kept], tv["w"][kept])
    with pytest.raises(ValueError, match="drop_rate"):
        dare(tv, 1.0)


def test_dare_then_ties_and_task_arithmetic_use_same_mask():
    pre, fts = make_models(2, seed=4)
    tvs = [dare(task_vector(pre, f), 0.5, seed=i) for i, f in enumerate(fts)]
    ta = task_arithmetic(pre, tvs, scaling=0.5)
    naive = {k: pre[k] + 0.5 * (tvs[0][k] + tvs[1][k]) for k in SHAPES}
    for k in SHAPES:
        torch.testing.assert_close(ta[k], naive[k])
    tie = ties_merging(pre, tvs, density=0.3)
    assert_sd_close(tie, naive_ties(pre, [{k: tv[k] for k in SHAPES} for tv in tvs], 1.0, 0.3, "global", "sum", "mean"))


def test_tied_weights_in_memory_are_merged_once_and_stay_tied():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(10, 4, generator=g)
    pre = {"shared.weight": emb, "lm_head.weight": emb, "x": torch.randn(6, generator=g)}
    ft_emb = emb + torch.randn(10, 4, generator=g)
    ft = {"shared.weight": ft_emb, "lm_head.weight": ft_emb, "x": pre["x"] + torch.randn(6, generator=g)}
    tv = task_vector(pre, ft)
    assert tv["shared.weight"].data_ptr() == tv["lm_head.weight"].data_ptr()
    merged = ties_merging(pre, [tv], density=0.5)
    assert merged["shared.weight"].data_ptr() == merged["lm_head.weight"].data_ptr()
    # Global top-k counts the tied tensor once: 40 + 6 entries, keep int(46*0.5)=23.
    flat = torch.cat([tv["shared.weight"].flatten(), tv["x"]])
    kth = flat.abs().kthvalue(46 - 23).values
    expect = emb + (tv["shared.weight"] * (tv["shared.weight"].abs() >= kth))
    torch.testing.assert_close(merged["shared.weight"], expect)


# ---------------------------------------------------------------- search
def test_search_scores_every_point_and_matches_direct_merge():
    pre, fts = make_models(2, seed=6)
    tvs = {"t0": task_vector(pre, fts[0]), "t1": task_vector(pre, fts[1])}
    target = ties_merging(pre, list(tvs.values()), scaling=0.5, density=0.2)

    def evaluate(sd):  # accuracy-like score: closeness to the TIES(0.5, 0.2) model, per "task"
        d = sum(float((sd[k] - target[k]).abs().sum()) for k in SHAPES)
        return {"t0": 1 / (1 + d), "t1": 0.5 / (1 + d)}

    res = search_coefficients(pre, tvs, evaluate, method="ties", finetuned_accuracy={"t0": 1.0, "t1": 0.5}, progress=False)
    assert len(res.points) == 18
    assert res.best_params == {"density": 0.2, "scaling": 0.5}
    assert res.best.score == pytest.approx(1.0)
    assert res.per_task_best["t1"]["params"] == {"density": 0.2, "scaling": 0.5}
    import json

    assert json.loads(res.to_json())["best"]["params"]["density"] == 0.2
    ta = search_coefficients(pre, tvs, lambda sd: {"t0": -float((sd["a.weight"] - fts[0]["a.weight"]).abs().sum())},
                             progress=False)
    assert [p.params["scaling"] for p in ta.points] == [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    dr = search_coefficients(pre, tvs, lambda sd: {"t0": 0.0}, method="dare_task_arithmetic",
                             grid={"drop_rate": [0.1, 0.5], "scaling": [0.3]}, progress=False)
    assert [p.params for p in dr.points] == [{"drop_rate": 0.1, "scaling": 0.3}, {"drop_rate": 0.5, "scaling": 0.3}]


# ---------------------------------------------------------------- properties
finite = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=1, max_size=30), st.lists(finite, min_size=1, max_size=30))
def test_property_task_arithmetic_one_task_scaling_one_is_finetuned(a, b):
    n = min(len(a), len(b))
    pre = {"w": torch.tensor(a[:n])}
    ft = {"w": torch.tensor(b[:n])}
    out = task_arithmetic(pre, [task_vector(pre, ft)], scaling=1.0)
    torch.testing.assert_close(out["w"], ft["w"], atol=1e-5, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.randoms(use_true_random=False), st.integers(0, 1000))
def test_property_weighted_average_is_order_invariant(n, rnd, seed):
    g = torch.Generator().manual_seed(seed)
    sds = [{"w": torch.randn(5, 3, generator=g), "b": torch.randn(2, generator=g)} for _ in range(n)]
    w = [rnd.uniform(0.1, 2.0) for _ in range(n)]
    perm = list(range(n))
    rnd.shuffle(perm)
    a = weighted_average(sds, w)
    b = weighted_average([sds[i] for i in perm], [w[i] for i in perm])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=1, max_size=40), st.integers(0, 100))
def test_property_ties_density_one_single_task_is_identity(vals, seed):
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(len(vals), generator=g)}
    tv = {"w": torch.tensor(vals)}
    out = ties_merging(pre, [tv], scaling=1.0, density=1.0)
    torch.testing.assert_close(out["w"], pre["w"] + tv["w"])


@settings(max_examples=30, deadline=None)
@given(st.lists(finite, min_size=1, max_size=40), st.integers(0, 10))
def test_property_dare_p0_is_identity(vals, seed):
    tv = {"w": torch.tensor(vals)}
    assert torch.equal(dare(tv, 0.0, seed=seed)["w"], tv["w"])


# ---------------------------------------------------------------- exact streaming threshold
def flat_kth(tensors, rank):
    return torch.cat([t.flatten().to(torch.float64) for t in tensors]).abs().kthvalue(rank).values.item()


@pytest.mark.parametrize("force_radix", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_streaming_threshold_equals_flattened_kthvalue(dtype, force_radix):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g).to(dtype) for s in [(13, 7), (1,), (50,), (4, 4, 4)]]
    tensors += [torch.zeros(9, dtype=dtype), torch.randint(-2, 3, (40,), generator=g).to(dtype),
                torch.tensor([float("inf"), -0.0, 1e-30], dtype=torch.float32).to(dtype)]
    total = sum(t.numel() for t in tensors)
    for rank in [1, 2, 9, 10, 11, total // 2, total - 1, total]:
        assert exact_kth_abs(lambda: tensors, rank, force_radix=force_radix) == flat_kth(tensors, rank), rank


def test_streaming_threshold_falls_back_when_the_sample_misleads():
    # A sample drawn before the data changes (here: a tiny sample budget and a huge run of ties)
    # cannot bracket the k-th value; the radix passes must still give the exact answer.
    from saft_hf.merging import topk

    tensors = [torch.full((5000,), 0.5), torch.linspace(-1, 1, 3001), torch.zeros(2000)]
    total = sum(t.numel() for t in tensors)
    old = (topk.StreamingThreshold.SAMPLE_SIZE, topk.StreamingThreshold.MAX_CANDIDATES)
    topk.StreamingThreshold.SAMPLE_SIZE, topk.StreamingThreshold.MAX_CANDIDATES = 8, 100
    try:
        for rank in (1, 1999, 2000, 2001, 4000, 7000, total):
            assert exact_kth_abs(lambda: tensors, rank) == flat_kth(tensors, rank), rank
    finally:
        topk.StreamingThreshold.SAMPLE_SIZE, topk.StreamingThreshold.MAX_CANDIDATES = old


def test_row_block_processing_gives_the_same_merge(monkeypatch):
    """Large tensors are merged in row blocks; force tiny blocks and compare with the naive merge."""
    from saft_hf.merging import engine

    monkeypatch.setattr(engine, "PIECE_ELEMENTS", 6)
    monkeypatch.setattr(engine, "_SMALL_TENSOR", 4)
    pre, fts = make_models(3, seed=8, integer=True)
    tvs = [task_vector(pre, ft) for ft in fts]
    for scope in ("global", "per_tensor"):
        got = ties_merging(pre, tvs, scaling=0.6, density=0.3, trim_scope=scope)
        assert_sd_close(got, naive_ties(pre, naive_tvs(pre, fts), 0.6, 0.3, scope, "sum", "mean"))
    ta = task_arithmetic(pre, tvs, scaling=0.5)
    for k in SHAPES:
        torch.testing.assert_close(ta[k], pre[k] + 0.5 * sum(tv[k] for tv in tvs))
    d = [dare(tv, 0.5, seed=i) for i, tv in enumerate(tvs)]
    torch.testing.assert_close(task_arithmetic(pre, d, 1.0)["d.weight"], pre["d.weight"] + sum(x["d.weight"] for x in d))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 1.0, -1.0, 2.5, -2.5, 1e-8, 3e38, 0.5]), min_size=1, max_size=20),
                min_size=1, max_size=8), st.data())
def test_property_streaming_threshold_with_ties(lists, data):
    tensors = [torch.tensor(v, dtype=torch.float32) for v in lists]
    total = sum(t.numel() for t in tensors)
    rank = data.draw(st.integers(1, total))
    assert exact_kth_abs(lambda: tensors, rank) == flat_kth(tensors, rank)


def test_streaming_threshold_many_tensors_and_nan_error():
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(int(torch.randint(1, 300, (1,), generator=g)), generator=g) for _ in range(200)]
    total = sum(t.numel() for t in tensors)
    for rank in (1, total // 3, total):
        assert exact_kth_abs(lambda: tensors, rank) == flat_kth(tensors, rank)
    with pytest.raises(ValueError, match="NaN"):
        exact_kth_abs(lambda: [torch.tensor([1.0, float("nan")])], 1)
    pre = {"w": torch.zeros(4)}
    with pytest.raises(ValueError, match="NaN"):
        ties_merging(pre, [{"w": torch.tensor([1.0, float("nan"), 2.0, 3.0])}], density=1.0)
