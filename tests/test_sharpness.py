"""saft_hf.sharpness: SAM/ASAM formulas against direct computation, scopes, non-finite handling."""

import math

import pytest
import torch

from saft_hf import sharpness

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, 3, generator=g), torch.randn(3, generator=g), torch.randn(2, 2, 2, generator=g)]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    return params, grads


def test_sam_is_rho_times_unit_gradient():
    params, grads = _tensors()
    expected_norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    e = [g.clone() for g in grads]
    result = sharpness.perturbation_(params, e, rho=0.05, adaptive=False)
    assert result.applied
    for ei, g in zip(e, grads):
        torch.testing.assert_close(ei, 0.05 * g / expected_norm, rtol=1e-6, atol=1e-8)
    assert float(result.perturbation_norm) == pytest.approx(0.05, rel=1e-5)
    assert float(result.grad_norm) == pytest.approx(expected_norm, rel=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_asam_all_scope_matches_formula(eta):
    params, grads = _tensors(1)
    scaled_grads = [(p.abs() + eta) * g for p, g in zip(params, grads)]
    n = torch.cat([t.flatten() for t in scaled_grads]).norm()
    expected = [0.5 * (p.abs() + eta) ** 2 * g / n for p, g in zip(params, grads)]
    e = [g.clone() for g in grads]
    result = sharpness.perturbation_(params, e, rho=0.5, adaptive=True, eta=eta)
    for ei, ex in zip(e, expected):
        torch.testing.assert_close(ei, ex, rtol=1e-6, atol=1e-8)
    # ASAM's normalised perturbation T^-1 e has norm rho
    assert float(torch.cat([(ei / (p.abs() + eta)).flatten() for ei, p in zip(e, params)]).norm()) == pytest.approx(0.5, rel=1e-5)
    assert float(result.grad_norm) == pytest.approx(float(n), rel=1e-6)
    for ei, ref in zip(e, sharpness.reference_perturbation(params, grads, rho=0.5, eta=eta)):
        torch.testing.assert_close(ei, ref, rtol=1e-6, atol=1e-8)


def test_weights_scope_leaves_other_tensors_unscaled():
    names = ["layer.weight", "layer.bias", "norm.weight"]
    mask = sharpness.adaptive_scale_mask(names, "weights")
    assert mask == [True, False, True]
    assert sharpness.adaptive_scale_mask(names, "all") == [True, True, True]
    with pytest.raises(ValueError, match="scope"):
        sharpness.adaptive_scale_mask(names, "biases")
    params, grads = _tensors(2)
    scales = [params[0].abs() + 0.01, torch.ones_like(params[1]), params[2].abs() + 0.01]
    n = torch.cat([(t * g).flatten() for t, g in zip(scales, grads)]).norm()
    e = [g.clone() for g in grads]
    sharpness.perturbation_(params, e, rho=0.5, eta=0.01, scaled=mask)
    for ei, t, g in zip(e, scales, grads):
        torch.testing.assert_close(ei, 0.5 * t * t * g / n, rtol=1e-6, atol=1e-8)
    for ei, ref in zip(e, sharpness.reference_perturbation(params, grads, rho=0.5, eta=0.01, scaled=mask)):
        torch.testing.assert_close(ei, ref, rtol=1e-6, atol=1e-8)


def test_chunked_scaling_equals_one_shot(monkeypatch):
    params, grads = _tensors(3)
    one_shot = [g.clone() for g in grads]
    sharpness.perturbation_(params, one_shot, rho=0.5)
    monkeypatch.setattr(sharpness, "_SCRATCH_NUMEL", 5)  # forces one tensor per chunk
    chunked = [g.clone() for g in grads]
    sharpness.perturbation_(params, chunked, rho=0.5)
    for a, b in zip(one_shot, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_is_not_applied(bad):
    params, grads = _tensors(4)
    grads[1][0] = bad
    result = sharpness.perturbation_(params, grads, rho=0.5)
    assert not result.applied and result.perturbation_norm is None
    assert not math.isfinite(float(result.grad_norm))


def test_all_finite_hook_can_veto_a_finite_gradient():
    params, grads = _tensors(5)
    seen = []

    def others_overflowed(local):
        seen.append(local)
        return False

    result = sharpness.perturbation_(params, grads, rho=0.5, all_finite=others_overflowed)
    assert seen == [True] and not result.applied


def test_loss_scale_invariance_for_fp16_first_pass():
    """A GradScaler-scaled first-pass gradient gives the same e (why the first pass never unscales)."""
    params, grads = _tensors(6)
    plain = [g.clone() for g in grads]
    scaled = [g.clone() * 65536.0 for g in grads]
    sharpness.perturbation_(params, plain, rho=0.5)
    sharpness.perturbation_(params, scaled, rho=0.5)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_perturb_and_restore_are_in_place_and_exact():
    params, grads = _tensors(7)
    flat = torch.cat([p.flatten() for p in params])
    views, offset = [], 0  # views into one flat buffer, like DeepSpeed ZeRO-1/2 parameters
    for p in params:
        views.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    before = flat.clone()
    e = [g * 1e-3 for g in grads]
    backups = sharpness.perturb_(views, e)
    torch.testing.assert_close(flat, before + torch.cat([x.flatten() for x in e]))
    sharpness.restore_(views, backups)
    assert torch.equal(flat, before)


def test_mismatched_lists_and_negative_rho_raise():
    params, grads = _tensors()
    with pytest.raises(ValueError, match="align"):
        sharpness.perturbation_(params, grads[:2], rho=0.5)
    with pytest.raises(ValueError, match="rho"):
        sharpness.perturbation_(params, grads, rho=-1.0)
    assert not sharpness.perturbation_([], [], rho=0.5).applied


@pytest.mark.parametrize("adaptive", [True, False])
def test_huge_but_finite_gradient_is_not_mistaken_for_overflow(adaptive):
    """A large fp16 loss scale can overflow the squares in ||g|| while every entry is finite."""
    params, grads = _tensors(8)
    plain = [g.clone() for g in grads]
    huge = [g.clone() * 1e30 for g in grads]
    sharpness.perturbation_(params, plain, rho=0.5, adaptive=adaptive)
    result = sharpness.perturbation_(params, huge, rho=0.5, adaptive=adaptive)
    assert result.applied and math.isfinite(float(result.grad_norm)) and float(result.grad_norm) > 1e29
    for a, b in zip(plain, huge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_perturb_releases_the_perturbation_chunk_by_chunk(monkeypatch):
    monkeypatch.setattr(sharpness, "_SCRATCH_NUMEL", 12)
    params, grads = _tensors(9)
    before = [p.clone() for p in params]
    e = [g * 1e-2 for g in grads]
    expected = [p + x for p, x in zip(params, e)]
    backups = sharpness.perturb_(params, e, release=True)
    assert e == [None, None, None]
    for p, x, b, o in zip(params, expected, backups, before):
        torch.testing.assert_close(p, x, rtol=0, atol=0)
        assert torch.equal(b, o)


def test_bf16_gradients_are_normed_in_float32():
    params, grads = _tensors(10)
    params16 = [p.bfloat16() for p in params]
    grads16 = [g.bfloat16() for g in grads]
    e16 = [g.clone() for g in grads16]
    result = sharpness.perturbation_(params16, e16, rho=0.5)
    assert result.grad_norm.dtype == torch.float32
    reference = sharpness.reference_perturbation([p.float() for p in params16], [g.float() for g in grads16], rho=0.5)
    for a, b in zip(e16, reference):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=1e-4)


# ---------------------------------------------------------------- helpers of the SAM variants
def _flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def test_global_dot_and_orthogonal_component():
    torch.manual_seed(0)
    a = [torch.randn(3, 4), torch.randn(5)]
    b = [torch.randn(3, 4), torch.randn(5)]
    assert sharpness.global_dot(a, b) == pytest.approx(float(_flat(a) @ _flat(b)), rel=1e-6)
    v = sharpness.orthogonal_component(a, b)
    assert float(_flat(v) @ _flat(b)) == pytest.approx(0.0, abs=1e-5)
    # v + projection = a
    coefficient = float(_flat(a) @ _flat(b)) / float(_flat(b) @ _flat(b))
    assert torch.allclose(_flat(v) + coefficient * _flat(b), _flat(a), atol=1e-6)


def test_gsam_combine_equals_the_formula():
    torch.manual_seed(1)
    g_s = [torch.randn(4, 2), torch.randn(3)]
    g = [torch.randn(4, 2), torch.randn(3)]
    fs, fg = _flat(g_s), _flat(g)
    expected = fs - 0.3 * (fg - (fg @ fs) / (fs @ fs) * fs)
    sharpness.gsam_combine_(g_s, g, 0.3)
    assert torch.allclose(_flat(g_s), expected, atol=1e-6)


def test_looksam_reuse_equals_the_formula():
    torch.manual_seed(2)
    g = [torch.randn(6), torch.randn(2, 2)]
    v = [torch.randn(6), torch.randn(2, 2)]
    fg, fv = _flat(g), _flat(v)
    expected = fg + 0.7 * fg.norm() / fv.norm() * fv
    sharpness.looksam_reuse_(g, v, 0.7)
    assert torch.allclose(_flat(g), expected, atol=1e-6)


@pytest.mark.parametrize("running", [False, True])
def test_fisher_perturbation_lies_on_the_ellipsoid(running):
    torch.manual_seed(3)
    g = [torch.randn(5, 3), torch.randn(4)]
    fisher = [torch.rand(5, 3), torch.rand(4)] if running else None
    f = [1 + 2.0 * (x if running else y * y) for x, y in zip(fisher or g, g)]
    expected_direction = _flat([a / b for a, b in zip(g, f)])
    result = sharpness.fisher_perturbation_(g, rho=0.1, eta=2.0, fisher=fisher)
    e = _flat(g)
    assert result.applied
    assert float((e * e * _flat(f)).sum().sqrt()) == pytest.approx(0.1, rel=1e-5)  # e^T diag(f) e = rho^2
    assert torch.allclose(e / e.norm(), expected_direction / expected_direction.norm(), atol=1e-6)


def test_fisher_perturbation_skips_non_finite_gradients():
    g = [torch.tensor([1.0, float("inf")])]
    assert not sharpness.fisher_perturbation_(g, rho=0.1, eta=1.0).applied


def test_filterwise_gaussian_scales_rows_and_leaves_vectors():
    w = torch.cat([torch.ones(1, 400), 10 * torch.ones(1, 400)])
    bias = torch.ones(2)
    noise = sharpness.filterwise_gaussian([w, bias], 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(noise[1], torch.zeros(2))
    # row i: std sigma * ||W_i|| / sqrt(n) = 0.1 * |w_ij| here
    assert noise[0][0].std().item() == pytest.approx(0.1, rel=0.15)
    assert noise[0][1].std().item() == pytest.approx(1.0, rel=0.15)
    again = sharpness.filterwise_gaussian([w, bias], 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(noise[0], again[0])


def test_sharpest_examples_picks_the_largest_increases():
    before = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    after = torch.tensor([1.1, 3.0, 0.5, 2.0, 1.0])
    assert sharpness.sharpest_examples(before, after, 0.4).tolist() == [1, 3]
    assert sharpness.sharpest_examples(before, after, 0.01).tolist() == [1]  # at least one
    with pytest.raises(ValueError, match="per-example losses"):
        sharpness.sharpest_examples(before, after[:3], 0.5)
