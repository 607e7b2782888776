"""Model Stock and SLERP against naive numpy implementations of their formulas, with the edge
cases the papers / mergekit discuss: near-parallel tensors (SLERP's linear fallback, Model
Stock's cos = 1), zero task vectors, opposite deltas, a single model (refused), three models for
SLERP (refused), per-layer t."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saft_hf.merging import merge, merge_finetuned, model_stock, registry, slerp

SHAPES = {"w": (6, 5), "b": (6,), "conv": (3, 2, 2), "s": (1,)}


def models(num, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    pre["ids"] = torch.arange(3)
    fts = [{**{k: pre[k] + scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}, "ids": pre["ids"]}
           for _ in range(num)]
    return pre, fts


# ------------------------------------------------------------------ Model Stock
def naive_model_stock(w0, ws, filter_wise=False):
    w0 = w0.double().numpy()
    ws = [w.double().numpy() for w in ws]
    k = len(ws)
    rows = w0.shape[0] if filter_wise and w0.ndim > 1 else 1
    d = [(w - w0).reshape(rows, -1) for w in ws]
    t = np.zeros(rows)
    for r in range(rows):
        cos = []
        for i in range(k):
            for j in range(i + 1, k):
                a, b = d[i][r], d[j][r]
                na, nb = np.linalg.norm(a), np.linalg.norm(b)
                cos.append(0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb)))
        c = min(max(np.mean(cos), 0.0), 1.0)
        t[r] = k * c / (1 + (k - 1) * c)
    avg = sum(ws) / k
    t = t.reshape(rows, *([1] * (w0.ndim - 1))) if rows > 1 else t[0]
    return torch.from_numpy(t * avg + (1 - t) * w0)


def correlated(num, seed, rho):
    """Fine-tuned models whose deltas share a common part: pairwise cosine about rho."""
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    common = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    fts = [{k: pre[k] + 0.1 * (math.sqrt(rho) * common[k] + math.sqrt(1 - rho) * torch.randn(s, generator=g))
            for k, s in SHAPES.items()} for _ in range(num)]
    return pre, fts


@pytest.mark.parametrize("num", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_naive(num, filter_wise):
    pre, fts = correlated(num, seed=num, rho=0.6)
    tvs = [{k: ft[k] - pre[k] for k in SHAPES} for ft in fts]
    merged = model_stock(pre, tvs, filter_wise=filter_wise)
    for k in SHAPES:
        want = naive_model_stock(pre[k], [ft[k] for ft in fts], filter_wise)
        torch.testing.assert_close(merged[k].double(), want, atol=1e-5, rtol=1e-5, msg=k)


def test_model_stock_ratio_for_two_models_is_the_papers():
    """k = 2: t = 2 cos / (1 + cos); built with a known angle of 60 degrees (cos 0.5 -> t 2/3)."""
    pre = {"w": torch.zeros(2, 2)}
    a = {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}
    b = {"w": torch.tensor([[0.5, math.sqrt(3) / 2], [0.0, 0.0]])}
    merged = model_stock(pre, [a, b])["w"]
    torch.testing.assert_close(merged, (2 / 3) * (a["w"] + b["w"]) / 2)


def test_model_stock_parallel_deltas_give_the_average():
    """cos = 1 -> t = 1: the plain average of the fine-tuned models."""
    pre, fts = models(1, seed=3)
    tv = {k: fts[0][k] - pre[k] for k in SHAPES}
    tvs = [tv, {k: 2 * v for k, v in tv.items()}, {k: 0.5 * v for k, v in tv.items()}]
    merged = model_stock(pre, tvs)
    for k in SHAPES:
        torch.testing.assert_close(merged[k], pre[k] + (tv[k] * 3.5) / 3, atol=1e-6, rtol=1e-6)


def test_model_stock_opposite_or_zero_deltas_give_the_pretrained_model():
    pre, fts = models(1, seed=4)
    tv = {k: fts[0][k] - pre[k] for k in SHAPES}
    for tvs in ([tv, {k: -v for k, v in tv.items()}], [tv, {k: torch.zeros_like(v) for k, v in tv.items()}],
                [{k: torch.zeros_like(v) for k, v in tv.items()}] * 2):
        merged = model_stock(pre, tvs)
        assert all(torch.equal(merged[k], pre[k]) for k in SHAPES)


def test_model_stock_small_deltas_keep_their_angle():
    """Bias-sized deltas (|a||b| << 1e-6): the cosine is exact, not shrunk by mergekit's clamp."""
    pre = {"b": torch.zeros(8)}
    a = {"b": torch.full((8,), 1e-5)}
    merged = model_stock(pre, [a, a])["b"]
    torch.testing.assert_close(merged, a["b"])


def test_model_stock_needs_two_models():
    pre, fts = models(1)
    with pytest.raises(registry.ParamError, match="model_stock merges at least 2 models"):
        model_stock(pre, [{k: fts[0][k] - pre[k] for k in SHAPES}])


# ------------------------------------------------------------------ SLERP
def naive_slerp(t, v0, v1, threshold=0.9995):
    a, b = v0.double().numpy().ravel(), v1.double().numpy().ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = float(a @ b / (na * nb)) if na > 1e-8 and nb > 1e-8 else 1.0  # no angle: linear
    if abs(dot) > threshold:
        out = (1 - t) * a + t * b
    else:
        om = math.acos(dot)
        out = math.sin((1 - t) * om) / math.sin(om) * a + math.sin(t * om) / math.sin(om) * b
    return torch.from_numpy(out.reshape(v0.shape))


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_naive(t):
    _, (a, b) = models(2, seed=5, scale=1.0)
    merged = slerp(a, b, t)
    for k in SHAPES:
        torch.testing.assert_close(merged[k].double(), naive_slerp(t, a[k], b[k]), atol=1e-5, rtol=1e-5, msg=k)
    assert torch.equal(merged["ids"], a["ids"])


def test_slerp_endpoints_and_norm_on_orthogonal_unit_vectors():
    a, b = {"v": torch.tensor([1.0, 0.0])}, {"v": torch.tensor([0.0, 1.0])}
    mid = slerp(a, b, 0.5)["v"]
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    torch.testing.assert_close(slerp(a, b, 0.0)["v"], a["v"])
    torch.testing.assert_close(slerp(a, b, 1.0)["v"], b["v"])


def test_slerp_near_parallel_tensors_fall_back_to_linear():
    a = {"v": torch.tensor([1.0, 2.0, 3.0])}
    b = {"v": torch.tensor([2.0, 4.0, 6.0001])}  # cos ~ 1
    torch.testing.assert_close(slerp(a, b, 0.3)["v"], 0.7 * a["v"] + 0.3 * b["v"])
    # just below the threshold the spherical formula is used (not the linear one)
    c = {"v": torch.tensor([1.0, 0.0])}
    d = {"v": torch.tensor([math.cos(0.05), math.sin(0.05)])}  # cos = 0.99875 < 0.9995
    got = slerp(c, d, 0.5)["v"]
    torch.testing.assert_close(got, torch.tensor([math.cos(0.025), math.sin(0.025)]))
    assert not torch.allclose(got, 0.5 * (c["v"] + d["v"]), atol=1e-6)


def test_slerp_opposite_and_zero_tensors_are_linear():
    a, b = {"v": torch.tensor([1.0, -2.0])}, {"v": torch.tensor([-1.0, 2.0])}
    torch.testing.assert_close(slerp(a, b, 0.25)["v"], 0.75 * a["v"] + 0.25 * b["v"])
    z = {"v": torch.zeros(2)}
    torch.testing.assert_close(slerp(z, b, 0.25)["v"], 0.25 * b["v"])


def test_slerp_with_a_pretrained_reference_is_the_same_interpolation():
    pre, (a, b) = models(2, seed=6)
    x = merge_finetuned("slerp", pre, [a, b], t=0.4)
    y = slerp(a, b, 0.4)
    for k in SHAPES:
        torch.testing.assert_close(x[k], y[k], atol=1e-6, rtol=1e-6)


def test_slerp_per_layer_t():
    _, (a, b) = models(2, seed=7, scale=1.0)
    rules = [{"pattern": r"^w$", "value": 0.0}, {"glob": "c*", "value": 1.0}, {"value": 0.5}]
    merged = slerp(a, b, rules)
    torch.testing.assert_close(merged["w"], a["w"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged["conv"], b["conv"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged["b"].double(), naive_slerp(0.5, a["b"], b["b"]), atol=1e-6, rtol=1e-6)


def test_slerp_needs_exactly_two_models():
    pre, fts = models(3)
    with pytest.raises(registry.ParamError, match="slerp merges exactly 2 models .*got 3"):
        merge_finetuned("slerp", None, fts)
    with pytest.raises(registry.ParamError, match="slerp merges exactly 2 models"):
        registry.validate_params("slerp", {}, num_tasks=1)


def test_two_model_methods_are_left_out_of_larger_studies():
    assert "slerp" in registry.method_names(study_only=True, num_tasks=2)
    assert "slerp" not in registry.method_names(study_only=True, num_tasks=3)
    assert "model_stock" not in registry.method_names(study_only=True, num_tasks=1)
    assert "slerp" not in [r.method for r in registry.study_rows(num_tasks=8)]
