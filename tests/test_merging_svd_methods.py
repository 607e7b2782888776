"""TSV-M, Iso-C and Iso-CTS against naive numpy (float64) implementations of the papers' code
(zero-padded singular-vector slots, orthogonalisation by SVD), plus the edge cases: a single
task, zero task vectors, rank-deficient task matrices, matrices with fewer singular values than
tasks, non-2-D tensors (task-vector mean)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from saft_hf.merging import iso_c, iso_cts, merge, registry, task_vector, tsv_merging

SHAPES = {"attn.w": (12, 9), "mlp.w": (6, 10), "tiny.w": (3, 5), "attn.b": (12,), "conv.w": (4, 2, 3),
          "pos": (2, 7)}
EPS32 = float(np.finfo(np.float32).eps)


def models(num_tasks, seed=0, rank=None, zero=()):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    pre["ids"] = torch.arange(3)
    tvs = []
    for t in range(num_tasks):
        tv = {}
        for k, s in SHAPES.items():
            if t in zero:
                tv[k] = torch.zeros(s)
            elif rank is not None and len(s) == 2:
                # exactly rank-`rank` in float32: small integers, products exact
                a = torch.randint(-3, 4, (s[0], rank), generator=g).float()
                b = torch.randint(-3, 4, (rank, s[1]), generator=g).float()
                tv[k] = (a @ b) / 64
            else:
                tv[k] = 0.1 * torch.randn(s, generator=g)
        tvs.append(tv)
    return pre, tvs


def polar_np(x):
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def drop_null(u, s, vt, scale, shape):
    """The documented convention: components with s <= max(m, n) * eps32 * scale are left out."""
    keep = s > max(shape) * EPS32 * scale
    return u[:, keep], s[keep], vt[keep]


# ------------------------------------------------------------------ naive implementations
def naive_tsv(mats, alpha=1.0, null_drop=False):
    """The TSV-M reference: per task, top int(r/T) components placed in its own slot of zero-padded
    U (m x r), S (r), V (r x n); U and V replaced by U_u V_u (their polar factors)."""
    T = len(mats)
    m, n = mats[0].shape
    r = min(m, n)
    k = max(1, int(r * (1.0 / T)))
    if null_drop:  # rank-deficient inputs: concatenate only the non-null components
        us, ss, vs = [], [], []
        for w in mats:
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            u, s, vt = drop_null(u[:, :k], s[:k], vt[:k], s[0] if s.size else 0.0, w.shape)
            us.append(u), ss.append(s), vs.append(vt)
        s = np.concatenate(ss)
        if s.size == 0:
            return np.zeros((m, n))
        return alpha * polar_np(np.concatenate(us, 1)) @ np.diag(s) @ polar_np(np.concatenate(vs, 0))
    width = max(r, T * k)
    su, ss, sv = np.zeros((m, width)), np.zeros(width), np.zeros((width, n))
    for i, w in enumerate(mats):
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        su[:, i * k:(i + 1) * k] = u[:, :k]
        ss[i * k:(i + 1) * k] = s[:k]
        sv[i * k:(i + 1) * k] = vt[:k]
    return alpha * polar_np(su) @ np.diag(ss) @ polar_np(sv)


def naive_iso_c(mats, alpha=1.0):
    total = sum(mats)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    s_iso = np.where(s > max(total.shape) * EPS32 * s[0], s.mean(), 0.0)
    return alpha * u @ np.diag(s_iso) @ vt


def naive_iso_cts(mats, k=0.8, alpha=1.0):
    """The Iso-CTS reference: common space from the SVD of the sum, task-specific directions from
    each residual W_t - U_c U_c^T W_t, slots [task 1 | ... | task T | common], polar factors,
    every singular value replaced by the mean over the r slots."""
    T = len(mats)
    m, n = mats[0].shape
    r = min(m, n)
    c = int(r * k)
    ts = round((r - c) / T) * T
    if ts > r:
        ts = (r // T) * T
    c = r - ts
    per = ts // T
    total = sum(mats)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    uc, sc, vc = u[:, :c], s[:c], vt[:c]
    cols_u, cols_v, svals = [], [], []
    for w in mats:
        res = w - uc @ uc.T @ w
        ut, st, vtt = np.linalg.svd(res, full_matrices=False)
        keep = st[:per] > max(w.shape) * EPS32 * np.linalg.norm(w)
        cols_u.append(ut[:, :per][:, keep]), cols_v.append(vtt[:per][keep]), svals.append(st[:per])
    keep_c = sc > max(total.shape) * EPS32 * s[0]
    cols_u.append(uc[:, keep_c]), cols_v.append(vc[keep_c]), svals.append(sc)
    mean = np.concatenate(svals).sum() / r
    U, V = np.concatenate(cols_u, 1), np.concatenate(cols_v, 0)
    if U.shape[1] == 0:
        return np.zeros((m, n))
    return alpha * mean * polar_np(U) @ polar_np(V)


NAIVE = {"tsv_merging": naive_tsv, "iso_c": naive_iso_c, "iso_cts": naive_iso_cts}


def naive_merge(method, pre, tvs, alpha, **kw):
    out = {}
    for key in SHAPES:
        mats = [tv[key].double().numpy() for tv in tvs]
        if len(SHAPES[key]) == 2:
            d = NAIVE[method](mats, alpha=alpha, **kw)
        else:
            d = alpha * np.mean(mats, axis=0)
        out[key] = pre[key].double() + torch.from_numpy(d)
    return out


def check(merged, expected, tol=2e-5):
    for key in SHAPES:
        torch.testing.assert_close(merged[key].double(), expected[key], atol=tol, rtol=tol, msg=key)
    assert torch.equal(merged["ids"], torch.arange(3))


# ------------------------------------------------------------------ against the naive references
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5])
@pytest.mark.parametrize("method", ["tsv_merging", "iso_c", "iso_cts"])
def test_matches_naive_reference(method, num_tasks):
    pre, tvs = models(num_tasks, seed=num_tasks)
    merged = merge(method, pre, tvs, scaling=0.7)
    check(merged, naive_merge(method, pre, tvs, 0.7))


def test_named_functions_equal_generic_merge():
    pre, tvs = models(3)
    for fn, name, kw in [(tsv_merging, "tsv_merging", {}), (iso_c, "iso_c", {}),
                         (iso_cts, "iso_cts", {"common_space_fraction": 0.5})]:
        a, b = fn(pre, tvs, 1.3, **kw), merge(name, pre, tvs, scaling=1.3, **kw)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_iso_cts_common_fraction_matches_naive(fraction):
    pre, tvs = models(3, seed=7)
    merged = iso_cts(pre, tvs, 1.1, common_space_fraction=fraction)
    check(merged, naive_merge("iso_cts", pre, tvs, 1.1, k=fraction))


def test_iso_cts_with_full_common_space_is_iso_c():
    pre, tvs = models(4, seed=3)
    a, b = iso_cts(pre, tvs, 1.0, common_space_fraction=1.0), iso_c(pre, tvs, 1.0)
    for k in SHAPES:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ edge cases
def test_tsv_single_task_reconstructs_the_task_vector():
    """T = 1: every component kept, U and V already orthonormal -> the task vector itself."""
    pre, tvs = models(1, seed=4)
    merged = tsv_merging(pre, tvs, 0.5)
    for k in SHAPES:
        torch.testing.assert_close(merged[k], pre[k] + 0.5 * tvs[0][k], atol=1e-5, rtol=1e-5)


def test_iso_c_single_task_is_flat_spectrum_of_that_task():
    pre, tvs = models(1, seed=5)
    w = tvs[0]["attn.w"].double().numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    got = iso_c(pre, tvs, 1.0)["attn.w"].double() - pre["attn.w"].double()
    torch.testing.assert_close(got, torch.from_numpy(s.mean() * u @ vt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["tsv_merging", "iso_c", "iso_cts"])
def test_all_zero_task_vectors_give_the_pretrained_model(method):
    pre, tvs = models(3, zero=(0, 1, 2))
    merged = merge(method, pre, tvs, scaling=1.0)
    for k in SHAPES:
        assert torch.equal(merged[k], pre[k]), k


@pytest.mark.parametrize("method", ["tsv_merging", "iso_c", "iso_cts"])
def test_rank_deficient_task_matrices_match_naive_with_null_directions_left_out(method):
    """Rank-1 task matrices: the top-k components of each task include zero singular values
    whose vectors are arbitrary; they are left out (documented), so the result is well defined."""
    pre, tvs = models(3, seed=6, rank=1)
    kw = {"null_drop": True} if method == "tsv_merging" else {}
    merged = merge(method, pre, tvs, scaling=1.0)
    check(merged, naive_merge(method, pre, tvs, 1.0, **kw), tol=1e-4)
    for k in SHAPES:
        assert torch.isfinite(merged[k]).all()


def test_tsv_one_zero_task_contributes_nothing():
    pre, tvs = models(3, seed=8, zero=(1,))
    merged = tsv_merging(pre, tvs, 1.0)
    check(merged, naive_merge("tsv_merging", pre, tvs, 1.0, null_drop=True), tol=1e-4)


def test_tsv_matrix_with_fewer_singular_values_than_tasks_keeps_one_each():
    """tiny.w is 3 x 5 (r = 3) merged from 5 tasks: the reference keeps int(3/5) = 0 components
    (a zero delta); here each task keeps one (documented), i.e. 5 orthogonalised rank-1 parts."""
    pre, tvs = models(5, seed=9)
    merged = tsv_merging(pre, tvs, 1.0)
    delta = merged["tiny.w"] - pre["tiny.w"]
    assert delta.abs().sum() > 0
    check(merged, naive_merge("tsv_merging", pre, tvs, 1.0))


def test_non_matrix_tensors_are_the_task_vector_mean():
    pre, tvs = models(3, seed=10)
    for method in ("tsv_merging", "iso_c", "iso_cts"):
        merged = merge(method, pre, tvs, scaling=2.0)
        for k in ("attn.b", "conv.w"):
            torch.testing.assert_close(merged[k], pre[k] + 2.0 * (tvs[0][k] + tvs[1][k] + tvs[2][k]) / 3,
                                       atol=1e-6, rtol=1e-6)


def test_svd_methods_are_declared_for_search_and_studies():
    for name in ("tsv_merging", "iso_c", "iso_cts"):
        m = registry.get_method(name)
        assert m.whole_tensors and m.linear_param == "scaling" and m.in_study and m.grid()["scaling"]
    assert registry.validate_params("iso_cts", {})["common_space_fraction"] == 0.8
    with pytest.raises(registry.ParamError, match="common_space_fraction must be in"):
        registry.validate_params("iso_cts", {"common_space_fraction": 1.5})


def test_task_vector_inputs_from_finetuned_models():
    pre, tvs = models(2, seed=11)
    fts = [{k: (pre[k] + tv[k]) if k in tv else pre[k] for k in pre} for tv in tvs]
    taus = [task_vector(pre, ft) for ft in fts]
    a, b = iso_c(pre, taus, 1.0), iso_c(pre, tvs, 1.0)
    for k in SHAPES:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["tsv_merging", "iso_c", "iso_cts", "model_stock", "della", "breadcrumbs"])
def test_nonfinite_task_vector_is_named(method):
    pre, tvs = models(2, seed=12)
    tvs[1]["attn.w"] = tvs[1]["attn.w"].clone()
    tvs[1]["attn.w"][2, 3] = float("nan")
    with pytest.raises(ValueError, match="task1: tensor 'attn.w' holds non-finite"):
        merge(method, pre, tvs)
