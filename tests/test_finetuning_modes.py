"""Which parameters train (full / FTLO) and the FTTS linearized model (first-order Taylor expansion)."""
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from saft_hf.finetuning import LinearizedModel, apply_finetuning_mode, count_parameters, ftlo_parameter_names


def tiny_encoder(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=8)
    return CLIPVisionModelWithProjection(config).to(dtype).eval()


def test_ftlo_trains_exactly_the_attention_projections():
    model = tiny_encoder()
    trainable = apply_finetuning_mode(model, "ftlo")
    expected = {f"vision_model.encoder.layers.{i}.self_attn.{proj}.{kind}"
                for i in range(2) for proj in ("q_proj", "k_proj", "v_proj", "out_proj") for kind in ("weight", "bias")}
    assert set(trainable) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    weights_only = apply_finetuning_mode(tiny_encoder(), "ftlo", include_bias=False)
    assert set(weights_only) == {n for n in expected if n.endswith("weight")}
    trainable_count, total = count_parameters(model)
    assert 0 < trainable_count < total


def test_ftlo_optimizer_step_changes_only_attention_projections():
    model = tiny_encoder()
    apply_finetuning_mode(model, "ftlo")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model(pixel_values=torch.randn(4, 3, 16, 16)).image_embeds.pow(2).sum().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(ftlo_parameter_names(model))


def test_full_mode_and_unknown_mode():
    model = tiny_encoder()
    apply_finetuning_mode(model, "ftlo")
    assert len(apply_finetuning_mode(model, "full")) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="unknown fine-tuning mode 'lora'"):
        apply_finetuning_mode(model, "lora")
    with pytest.raises(ValueError, match="FTLO found no attention linear layers"):
        apply_finetuning_mode(torch.nn.Sequential(torch.nn.Linear(2, 2)), "ftlo")


def _direction(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    # scaled like the weights (init std 0.02) so the step stays in the regime where Taylor holds
    return {n: 0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


@torch.no_grad()
def _shift(model, direction, eps):
    for n, p in model.named_parameters():
        p.add_(eps * direction[n])


def test_ftts_is_the_first_order_taylor_expansion():
    torch.set_num_threads(1)
    model = tiny_encoder(dtype=torch.float64)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    f0 = model(pixel_values=x).image_embeds.detach()
    lin = LinearizedModel(model)
    assert model.config._attn_implementation == "eager"  # forward-mode AD needs the eager attention
    with torch.no_grad():
        assert torch.allclose(lin(pixel_values=x).image_embeds, f0, atol=1e-12)  # at theta0: f_lin = f
    d = _direction(model)
    # eps: CLIP's eager attention takes its softmax in float32 even for a float64 model, so the
    # finite differences carry ~1e-7/eps of rounding noise; 1e-3 balances it against O(eps^2).
    eps = 1e-3
    # J d by central finite differences of the real (non-linear) network
    _shift(model, d, eps)
    with torch.no_grad():
        f_plus = model.__class__.forward(model, pixel_values=x).image_embeds.clone()
        lin_plus = lin(pixel_values=x).image_embeds.clone()
    _shift(model, d, -2 * eps)
    with torch.no_grad():
        f_minus = model.__class__.forward(model, pixel_values=x).image_embeds.clone()
        lin_minus = lin(pixel_values=x).image_embeds.clone()
    jd = (f_plus - f_minus) / (2 * eps)
    assert jd.abs().max() > 1e-2  # the direction actually moves the output
    torch.testing.assert_close((lin_plus - f0) / eps, jd, rtol=1e-3, atol=2e-4)
    torch.testing.assert_close((f0 - lin_minus) / eps, jd, rtol=1e-3, atol=2e-4)
    # f_lin is exactly affine in theta, even far from theta0 where f is not
    _shift(model, d, eps + 3.0)
    with torch.no_grad():
        far = lin(pixel_values=x).image_embeds
        f_far = model.__class__.forward(model, pixel_values=x).image_embeds
    torch.testing.assert_close(far - f0, 3.0 * jd, rtol=1e-3, atol=1e-3)
    assert (f_far - f0 - 3.0 * jd).abs().max() > 1e-2  # ...and the real network is not linear there


def test_ftts_gradients_flow_to_theta_and_saving_gives_a_normal_checkpoint(tmp_path):
    model = tiny_encoder()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lin = LinearizedModel(model)
    assert set(lin.state_dict()) == {f"model.{k}" for k in model.state_dict()}  # theta0 is never saved
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        lin(pixel_values=torch.randn(4, 3, 16, 16)).image_embeds.pow(2).sum().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    tv = lin.task_vector()
    assert any(v.abs().max() > 0 for v in tv.values())
    lin.save_pretrained(tmp_path)
    reloaded = CLIPVisionModelWithProjection.from_pretrained(tmp_path)
    for n, p in reloaded.named_parameters():
        torch.testing.assert_close(p, theta0[n] + tv[n])


def test_linearized_merged_weights_against_a_given_expansion_point():
    pretrained = tiny_encoder(seed=0)
    other = tiny_encoder(seed=3)
    lin = LinearizedModel(other, pretrained_state=pretrained.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        # the expansion point is the pretrained model: moving theta to theta0 recovers f(theta0)
        other.load_state_dict(pretrained.state_dict())
        torch.testing.assert_close(lin(pixel_values=x).image_embeds, pretrained(pixel_values=x).image_embeds)
    with pytest.raises(KeyError, match="pretrained_state has no tensor"):
        LinearizedModel(tiny_encoder(), pretrained_state={})
