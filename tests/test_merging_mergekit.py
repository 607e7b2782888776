"""`saft-hf merge` on mergekit YAML against mergekit 0.1.5 itself (a dev extra: `pip install
-e .[peers]`), on the same tiny Llama checkpoints, tensor for tensor.

Bit for bit: ties (per-model weights and densities, normalize on/off, lambda, rescale, int8_mask, the base
listed among the models, global-only parameters), task_arithmetic at lambda 1 without normalize,
dare_ties / dare_linear at density 1, out_dtype. Up to float32 rounding (coefficients folded into
one per model): linear, task_arithmetic with normalize / lambda. DARE at density < 1 cannot equal
mergekit's masks (drawn from torch's global RNG), so it is checked two ways: mergekit run with
saft-hf's masks patched into its sparsifier (then the outputs are bit for bit equal: same
rescaling, same consensus), and by the statistics of unpatched mergekit (kept fraction, L1 norm).
"""
from __future__ import annotations

import glob
import os

import pytest
import torch
import yaml

mergekit = pytest.importorskip("mergekit", reason="mergekit is a dev extra: pip install -e .[peers]")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from saft_hf.merging import merge_models  # noqa: E402
from saft_hf.merging.mergekit_config import MERGEKIT_METHODS  # noqa: E402
from saft_hf.merging.taskvectors import key_seed  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny Llama (float32, safetensors) and three fine-tuned copies with different deltas:
    different scales, one tensor left unchanged in one model (exact zeros), one model's
    delta the negative of another's in one tensor (sign sums exactly 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mk")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    sd0 = {k: v.clone() for k, v in base.state_dict().items()}
    deltas = []
    for i, scale in enumerate([0.01, 0.02, 0.005]):
        g = torch.Generator().manual_seed(100 + i)
        deltas.append({k: torch.randn(v.shape, generator=g) * scale for k, v in sd0.items()})
    deltas[1]["model.layers.0.mlp.up_proj.weight"].zero_()
    deltas[2]["model.layers.1.self_attn.v_proj.weight"] = -deltas[0]["model.layers.1.self_attn.v_proj.weight"]
    paths = []
    for i, d in enumerate(deltas):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict({k: sd0[k] + d[k] for k in sd0})
        m.save_pretrained(root / f"ft{i}")
        paths.append(str(root / f"ft{i}"))
    return {"root": root, "base": str(root / "base"), "models": paths, "sd0": sd0}


def _load(directory) -> dict:
    out = {}
    for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        out.update(load_file(f))
    return out


def run_both(ckpts, config: dict, tag: str, mergekit_config: dict | None = None):
    """(mergekit's output, saft-hf's output) for the same YAML (saft-hf reads it from a file, like the CLI)."""
    root = ckpts["root"]
    mk_out, saft_out = root / f"mk_{tag}", root / f"saft_{tag}"
    run_merge(MergeConfiguration.model_validate(mergekit_config or config), str(mk_out),
              MergeOptions(lazy_unpickle=False, copy_tokenizer=False, quiet=True, write_model_card=False))
    path = root / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    merge_models(str(path), saft_out, progress=False)
    mk, saft = _load(mk_out), _load(saft_out)
    assert set(mk) == set(saft)
    return mk, saft


def models(ckpts, weights, densities=None, extra=None):
    out = []
    for i, (path, w) in enumerate(zip(ckpts["models"], weights)):
        params = {"weight": w}
        if densities is not None:
            params["density"] = densities[i]
        out.append({"model": path, "parameters": params})
    return out + (extra or [])


def assert_bit_equal(mk, saft):
    differ = [k for k in mk if mk[k].dtype != saft[k].dtype or not torch.equal(mk[k], saft[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}: max |diff| " \
                       f"{(mk[differ[0]].double() - saft[differ[0]].double()).abs().max().item():.3g}"


EXACT = {
    "ties_uniform": ("ties", dict(weights=[1.0, 1.0, 1.0], densities=[0.2, 0.2, 0.2]), {}),
    "ties_weights_densities": ("ties", dict(weights=[1.0, 0.5, 0.7], densities=[0.5, 0.3, 0.9]), {}),
    "ties_no_normalize_lambda": ("ties", dict(weights=[1.0, 0.5, 0.7], densities=[0.5, 0.3, 0.9]),
                                 {"normalize": False, "lambda": 0.7}),
    "ties_negative_weight_int8_mask": ("ties", dict(weights=[1.0, -0.3, 0.7], densities=[0.6, 0.6, 1.0]),
                                       {"int8_mask": True}),
    "ties_global_params_only": ("ties", None, {"weight": 0.8, "density": 0.35}),
    "ties_rescale_l1": ("ties", dict(weights=[1.0, 0.5, 0.7], densities=[0.5, 0.3, 0.9]), {"rescale": True}),
    "ties_small_density_min1": ("ties", dict(weights=[1.0, 1.0, 2.0], densities=[0.01, 0.02, 0.03]), {}),
    "task_arithmetic": ("task_arithmetic", dict(weights=[1.0, 0.5, -0.7]), {}),
    "dare_ties_density1": ("dare_ties", dict(weights=[1.0, 0.5, 0.7], densities=[1.0, 1.0, 1.0]), {}),
    "dare_ties_density1_normalize": ("dare_ties", dict(weights=[1.0, 0.5, 0.7]), {"normalize": True}),
    "dare_linear_density1": ("dare_linear", dict(weights=[1.0, 0.5, 0.7], densities=[1.0, 1.0, 1.0]), {}),
}


@pytest.mark.parametrize("case", sorted(EXACT))
def test_bit_for_bit_equal_to_mergekit(ckpts, case):
    method, per_model, params = EXACT[case]
    cfg = {"merge_method": method, "base_model": ckpts["base"], "dtype": "float32"}
    if per_model is None:
        cfg["models"] = [{"model": p} for p in ckpts["models"]]
    else:
        cfg["models"] = models(ckpts, **per_model)
    if params:
        cfg["parameters"] = params
    mk, saft = run_both(ckpts, cfg, case)
    assert_bit_equal(mk, saft)
    sd0 = ckpts["sd0"]
    assert any(not torch.equal(saft[k], sd0[k]) for k in saft)  # a real merge, not the base


def test_base_listed_among_models_is_the_base(ckpts):
    """mergekit configs often list the base model under models: it is the base, not a task."""
    cfg = {"merge_method": "ties", "base_model": ckpts["base"], "dtype": "float32",
           "models": [{"model": ckpts["base"]}] + models(ckpts, [1.0, 0.5, 0.7], [0.4, 0.4, 0.4])}
    mk, saft = run_both(ckpts, cfg, "base_listed")
    assert_bit_equal(mk, saft)


CLOSE = {
    "linear_normalize": ("linear", dict(weights=[1.0, 0.5, 0.7]), {}),
    "linear_no_normalize": ("linear", dict(weights=[0.2, 0.5, 0.3]), {"normalize": False}),
    "task_arithmetic_normalize_lambda": ("task_arithmetic", dict(weights=[1.0, 0.5, 0.7]),
                                         {"normalize": True, "lambda": 0.5}),
    "dare_linear_density1_normalize_lambda": ("dare_linear", dict(weights=[1.0, 0.5, 0.7]),
                                              {"normalize": True, "lambda": 1.5}),
}


@pytest.mark.parametrize("case", sorted(CLOSE))
def test_equal_to_mergekit_up_to_float32_rounding(ckpts, case):
    """saft-hf folds normalize/lambda into one coefficient per model (and linear runs as theta_0 +
    sum w_t tau_t): the same numbers up to float32 rounding (|diff| <= a few ulps of ~1)."""
    method, per_model, params = CLOSE[case]
    cfg = {"merge_method": method, "dtype": "float32", "models": models(ckpts, **per_model)}
    if method != "linear":
        cfg["base_model"] = ckpts["base"]
    if params:
        cfg["parameters"] = params
    mk, saft = run_both(ckpts, cfg, case)
    worst = max((mk[k] - saft[k]).abs().max().item() for k in mk)
    assert worst <= 4e-7, worst
    # and far from a wrong merge: e.g. without normalization the weights would not sum to 1
    assert any(not torch.equal(mk[k], ckpts["sd0"][k]) for k in mk)


def test_linear_with_base_model_merges_it_too_like_mergekit(ckpts):
    """mergekit's linear merges base_model as one more input, weighted by the global `weight`."""
    cfg = {"merge_method": "linear", "base_model": ckpts["base"], "dtype": "float32",
           "models": models(ckpts, [1.0, 2.0, 1.0]), "parameters": {"weight": 3.0}}
    mk, saft = run_both(ckpts, cfg, "linear_base")
    assert max((mk[k] - saft[k]).abs().max().item() for k in mk) <= 4e-7


def test_out_dtype_bfloat16_bit_equal(ckpts):
    """Computed in float32, written in bfloat16: mergekit with dtype float32 + out_dtype bfloat16
    does exactly that, so the outputs are equal bit for bit."""
    cfg = {"merge_method": "ties", "base_model": ckpts["base"], "dtype": "float32", "out_dtype": "bfloat16",
           "models": models(ckpts, [1.0, 0.5, 0.7], [0.5, 0.3, 0.9])}
    mk, saft = run_both(ckpts, cfg, "out_bf16")
    assert all(t.dtype == torch.bfloat16 for t in saft.values())
    assert_bit_equal(mk, saft)


def test_dtype_bfloat16_differs_only_by_mergekits_bf16_arithmetic(ckpts):
    """`dtype: bfloat16`: mergekit computes in bfloat16, saft-hf in float32 then rounds once, so
    saft-hf's output is mergekit's float32 result rounded to bfloat16 (documented difference)."""
    base_cfg = {"merge_method": "ties", "base_model": ckpts["base"],
                "models": models(ckpts, [1.0, 0.5, 0.7], [0.5, 0.3, 0.9])}
    mk16, saft = run_both(ckpts, {**base_cfg, "dtype": "bfloat16"}, "dtype_bf16")
    mk32, _ = run_both(ckpts, {**base_cfg, "dtype": "float32", "out_dtype": "bfloat16"}, "dtype_bf16_ref",)
    assert_bit_equal(mk32, saft)
    assert any(not torch.equal(mk16[k], saft[k]) for k in saft)  # mergekit's bf16 arithmetic rounds more


# ------------------------------------------------------------------------------------------- DARE
@pytest.fixture
def saft_masks_in_mergekit(monkeypatch):
    """Patch mergekit's random sparsifier to use saft-hf's DARE masks (seed 0 + task index,
    tensor name): mergekit then rescales and merges the very entries saft-hf keeps."""
    from mergekit.merge_methods import generalized_task_arithmetic as gta
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, rescaled_masked_tensor

    state = {}
    original_merge_group, original_sparsify = gta.GeneralizedTaskArithmeticMerge.merge_group, gta.sparsify

    def merge_group(self, group, /, **parameters):
        state.update(name=group.metadata.name, entries=list(group.non_base), i=0)
        return original_merge_group(self, group, **parameters)

    def sparsify(tensor, density, method, rescale_norm=None, **kw):
        if method != SparsificationMethod.random or density >= 1:
            return original_sparsify(tensor, density, method, rescale_norm=rescale_norm, **kw)
        entry = state["entries"][state["i"]]
        state["i"] += 1
        task = state["order"].index(os.path.normpath(str(entry.id.model.path)))
        gen = torch.Generator().manual_seed(key_seed(0 + task, state["name"]))
        keep = torch.rand(tensor.shape, generator=gen) >= 1.0 - density
        return rescaled_masked_tensor(tensor, keep.to(tensor.dtype), rescale_norm)

    monkeypatch.setattr(gta.GeneralizedTaskArithmeticMerge, "merge_group", merge_group)
    monkeypatch.setattr(gta, "sparsify", sparsify)
    assert RescaleNorm.l1  # (mergekit's own rescaling is used as is)
    return state


@pytest.mark.parametrize("method,params", [
    ("dare_ties", {}), ("dare_ties", {"normalize": True, "lambda": 0.8}), ("dare_ties", {"rescale": False}),
    ("dare_linear", {}), ("dare_linear", {"rescale": False}),
])
def test_dare_with_the_same_masks_is_bit_equal(ckpts, saft_masks_in_mergekit, method, params):
    saft_masks_in_mergekit["order"] = [os.path.normpath(p) for p in ckpts["models"]]
    cfg = {"merge_method": method, "base_model": ckpts["base"], "dtype": "float32",
           "models": models(ckpts, [1.0, 0.5, 0.7], [0.5, 0.3, 0.8])}
    if params:
        cfg["parameters"] = params
    tag = f"dare_masks_{method}_{'_'.join(map(str, params))}"
    mk, saft = run_both(ckpts, cfg, tag)
    assert_bit_equal(mk, saft)


def _delta_stats(out, sd0, keys):
    nonzero = sum(int((out[k] != sd0[k]).sum()) for k in keys)
    total = sum(sd0[k].numel() for k in keys)
    l1 = sum(float((out[k].double() - sd0[k].double()).abs().sum()) for k in keys)
    return nonzero / total, l1


def test_dare_linear_statistics_match_unpatched_mergekit(ckpts):
    """One model, density 0.4: both keep ~40% of each tensor's entries and rescale the survivors
    to the tensor's exact L1 norm (mergekit's rescale); only which entries survive differs."""
    sd0 = ckpts["sd0"]
    cfg = {"merge_method": "dare_linear", "base_model": ckpts["base"], "dtype": "float32",
           "models": [{"model": ckpts["models"][0], "parameters": {"weight": 1.0, "density": 0.4}}]}
    mk, saft = run_both(ckpts, cfg, "dare_linear_stats")
    big = [k for k in sd0 if sd0[k].numel() >= 1000]
    tau = load_file(os.path.join(ckpts["models"][0], "model.safetensors"))
    for out in (mk, saft):
        frac, _ = _delta_stats(out, sd0, big)
        assert abs(frac - 0.4) < 0.02, frac  # ~15k entries: sd 0.004
        for k in big:
            d = out[k].double() - sd0[k].double()
            torch.testing.assert_close(d.abs().sum(), (tau[k].double() - sd0[k].double()).abs().sum(), rtol=1e-5, atol=0)
    assert any(not torch.equal(mk[k], saft[k]) for k in big)  # the masks do differ (different RNGs)


def test_dare_ties_statistics_match_unpatched_mergekit(ckpts):
    sd0 = ckpts["sd0"]
    cfg = {"merge_method": "dare_ties", "base_model": ckpts["base"], "dtype": "float32",
           "models": models(ckpts, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5])}
    mk, saft = run_both(ckpts, cfg, "dare_ties_stats")
    keys = [k for k in sd0 if sd0[k].numel() >= 1000]
    (f_mk, l1_mk), (f_saft, l1_saft) = _delta_stats(mk, sd0, keys), _delta_stats(saft, sd0, keys)
    assert abs(f_mk - f_saft) < 0.02, (f_mk, f_saft)
    assert abs(l1_mk - l1_saft) / l1_mk < 0.03, (l1_mk, l1_saft)


# ------------------------------------------------------------------- methods landing from `methods`
LATER = {
    "breadcrumbs": ({"density": 0.5, "gamma": 0.05}, "deterministic"),
    "breadcrumbs_ties": ({"density": 0.5, "gamma": 0.05}, "deterministic"),
    "della": ({"density": 0.5, "epsilon": 0.1}, "random"),
    "della_linear": ({"density": 0.5, "epsilon": 0.1}, "random"),
    "model_stock": ({}, "deterministic"),
    "slerp": ({}, "deterministic"),
}


@pytest.mark.parametrize("name", sorted(n for n in LATER if n != "model_stock"))  # Model Stock: test below
def test_methods_from_the_methods_branch(ckpts, name):
    row = MERGEKIT_METHODS[name]
    if row.missing():
        pytest.skip(f"method not in registry yet ({', '.join(row.missing())})")
    per_model, kind = LATER[name]
    cfg = {"merge_method": name, "base_model": ckpts["base"], "dtype": "float32"}
    if name == "slerp":
        cfg.update(models=[{"model": ckpts["base"]}, {"model": ckpts["models"][0]}], parameters={"t": 0.3})
    elif name == "model_stock":
        cfg["models"] = [{"model": p} for p in ckpts["models"]]
    else:
        cfg["models"] = [{"model": p, "parameters": {"weight": w, **per_model}}
                         for p, w in zip(ckpts["models"], [1.0, 0.5, 0.7])]
    mk, saft = run_both(ckpts, cfg, f"later_{name}")
    sd0 = ckpts["sd0"]
    if kind == "deterministic":
        worst = max((mk[k] - saft[k]).abs().max().item() for k in mk)
        assert worst <= 1e-6, worst
    else:
        keys = [k for k in sd0 if sd0[k].numel() >= 1000]
        (f_mk, l1_mk), (f_saft, l1_saft) = _delta_stats(mk, sd0, keys), _delta_stats(saft, sd0, keys)
        assert abs(f_mk - f_saft) < 0.02 and abs(l1_mk - l1_saft) / l1_mk < 0.03


def _mergekit_model_stock_ratio(deltas: list[torch.Tensor]) -> torch.Tensor:
    """mergekit 0.1.5's rule, written from its source: mean pairwise cosine with |a||b| clamped at 1e-6 and each
    cosine clamped to [-1, 1]; t = k cos / (1 + (k - 1) cos), 0 where the denominator is ~0."""
    flat = [d.reshape(-1).double() for d in deltas]
    cosines = [(a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-6) for i, a in enumerate(flat) for b in flat[i + 1:]]
    cos = torch.stack([c.clamp(-1, 1) for c in cosines]).mean()
    k = len(deltas)
    denominator = 1 + (k - 1) * cos
    return torch.tensor(0.0, dtype=torch.float64) if denominator.abs() < 1e-6 else k * cos / denominator


def test_model_stock_differs_from_mergekit_exactly_where_documented(ckpts):
    """saft-hf clamps the mean cosine to [0, 1] (t in [0, 1], the paper's acute-angle assumption); mergekit keeps a
    negative cosine, so t < 0 moves *away* from the fine-tuned average (t = -3 for the fixture's tensor where one
    delta is the negative of another). Every tensor with a non-negative mean cosine agrees; every one with a negative
    mean cosine is the base weight in saft-hf and mergekit's negative-t extrapolation there (the 0.06 gap)."""
    sd0 = ckpts["sd0"]
    fts = [_load(p) for p in ckpts["models"]]
    cfg = {"merge_method": "model_stock", "base_model": ckpts["base"], "dtype": "float32",
           "models": [{"model": p} for p in ckpts["models"]]}
    mk, saft = run_both(ckpts, cfg, "model_stock_explained")
    negative = 0
    for key in sd0:
        deltas = [ft[key].double() - sd0[key].double() for ft in fts]
        t = _mergekit_model_stock_ratio(deltas)
        mean = sum(deltas) / len(deltas)
        torch.testing.assert_close(mk[key].double(), sd0[key].double() + t * mean, atol=2e-6, rtol=0, msg=key)
        if t >= 0:
            torch.testing.assert_close(saft[key], mk[key], atol=2e-6, rtol=0, msg=key)
        else:
            negative += 1
            assert torch.equal(saft[key], sd0[key]), key  # cos clamped to 0: t = 0, the base weight
    assert negative >= 1  # the fixture has the opposite-delta tensor (mean cosine about -1/3)
