"""mergekit YAML -> saft-hf merge config (no mergekit needed): the mapping table, every rejected
key, the CLI on a mergekit file; and saft-hf's own config gaps (per-model keys, out_dtype)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from saft_hf.cli import main
from saft_hf.merging import MergeConfig, merge_finetuned, merge_models
from saft_hf.merging import mergekit_config as mkc
from saft_hf.merging.registry import ParamError

SHAPES = {"w": (6, 4), "b": (6,)}


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    save_file(pre, str(tmp_path / "pre.safetensors"))
    for i, ft in enumerate(fts):
        save_file(ft, str(tmp_path / f"ft{i}.safetensors"))
    return tmp_path, pre, fts


def mk(root, method="ties", params=None, per_model=({"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.3}),
       **top):
    cfg = {"merge_method": method, "base_model": str(root / "pre.safetensors"),
           "models": [{"model": str(root / f"ft{i}.safetensors"), "parameters": dict(p)} for i, p in enumerate(per_model)]}
    if params is not None:
        cfg["parameters"] = params
    cfg.update(top)
    return cfg


# ------------------------------------------------------------------------------ the mapping table
def test_ties_translation(files):
    root, _, _ = files
    config, notes = mkc.translate(mk(root, params={"normalize": False, "lambda": 0.7}, dtype="bfloat16"))
    assert config["method"] == "ties" and config["transforms"] == [] and config["out_dtype"] == "bfloat16"
    assert config["params"] == {"scaling": 0.7, "density": [0.5, 0.3], "trim_scope": "per_tensor",
                                "trim_count": "exact_min1", "weights": [1.0, 0.5], "weighting": "mergekit",
                                "sign_method": "sum", "disjoint": "sum", "zero_sign": "positive"}
    assert "merge_method ties runs as saft-hf ties" in notes[0]
    assert any("dtype bfloat16: mergekit computes in it; saft-hf computes in float32" in n for n in notes)
    assert not any("computes in float32" in n for n in mkc.translate(mk(root, dtype="float32"))[1])


def test_defaults_follow_mergekit_per_method(files):
    root, _, _ = files
    ties, _ = mkc.translate(mk(root))
    assert ties["params"]["disjoint"] == "mean"  # ties: normalize defaults to true
    dare_ties, _ = mkc.translate(mk(root, "dare_ties"))
    assert dare_ties["params"]["disjoint"] == "sum" and dare_ties["params"]["density"] == 1.0  # normalize false
    assert dare_ties["transforms"] == [{"name": "dare", "drop_rate": [0.5, 0.7], "seed": 0, "rescale": "l1",
                                        "min_norm": 1e-7}]
    lin, _ = mkc.translate(mk(root, "dare_linear", params={"rescale": False, "lambda": 2.0}))
    assert lin["method"] == "task_arithmetic" and lin["params"] == {"scaling": [2.0, 1.0]}
    assert lin["transforms"][0]["rescale"] == "none"
    ta, notes = mkc.translate(mk(root, "task_arithmetic", params={"normalize": True}))
    assert ta["params"] == {"scaling": [1.0 / 1.5, 0.5 / 1.5]}
    assert any("density and rescale do nothing" in n for n in notes)
    linear, _ = mkc.translate(mk(root, "linear", per_model=({"weight": 2.0}, {"weight": 1.0}), params={"weight": 1.0}))
    assert linear["method"] == "weighted_average" and linear["params"] == {"weights": [2.0, 1.0, 1.0], "normalize": True}
    assert linear["models"][-1]["path"].endswith("pre.safetensors")  # mergekit merges base_model too


def test_ties_rescale_maps_to_trim_rescale(files):
    root, _, _ = files
    config, _ = mkc.translate(mk(root, params={"rescale": True}))
    assert config["params"]["trim_rescale"] == "l1"
    assert "trim_rescale" not in mkc.translate(mk(root))[0]["params"]


def test_global_parameters_are_per_model_defaults(files):
    root, _, _ = files
    config, _ = mkc.translate(mk(root, per_model=({}, {"density": 0.9}), params={"weight": 0.5, "density": 0.2}))
    assert config["params"]["weights"] == [0.5, 0.5] and config["params"]["density"] == [0.2, 0.9]


def test_base_listed_among_models_is_dropped(files):
    root, _, _ = files
    cfg = mk(root)
    cfg["models"].insert(0, {"model": str(root / "pre.safetensors")})
    config, _ = mkc.translate(cfg)
    assert [m["path"] for m in config["models"]] == [str(root / "ft0.safetensors"), str(root / "ft1.safetensors")]


def test_every_row_names_a_method_and_rows_not_registered_say_not_supported_yet(files, monkeypatch):
    root, _, _ = files
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"} <= set(mkc.supported_methods())
    assert set(mkc.MERGEKIT_METHODS) >= {"breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "slerp"}
    monkeypatch.setitem(mkc.MERGEKIT_METHODS, "future", mkc.Row("future", "no_such_method", ("no_such_transform",),
                                                                {}, {}, lambda s, p: ({}, [])))
    with pytest.raises(ParamError, match=r"merge_method 'future' is not supported yet: it maps to saft-hf "
                                         r"no_such_method \+ no_such_transform, and method no_such_method, "
                                         r"transform no_such_transform is not in this saft-hf's registry"):
        mkc.translate(mk(root, "future", per_model=({}, {})))
    for name, row in mkc.MERGEKIT_METHODS.items():
        if row.missing() and name != "future":
            with pytest.raises(ParamError, match=f"merge_method '{name}' is not supported yet"):
                mkc.translate(mk(root, name, per_model=({}, {})))


REJECTED = [
    ({"slices": []}, r"mergekit config key\(s\) \['slices'\] are not supported by saft-hf merge; supported: "
                     r"\['merge_method', 'base_model', 'models', 'parameters', 'dtype', 'out_dtype', 'tokenizer_source'\]"),
    ({"chat_template": "auto", "tokenizer": {}}, r"key\(s\) \['chat_template', 'tokenizer'\] are not supported"),
    ({"merge_method": "nuslerp"}, r"merge_method 'nuslerp' is not supported by saft-hf merge; supported: \['linear'"),
    ({"parameters": {"gamma": 0.1}}, r"ties: parameter\(s\) \['gamma'\] are not supported; supported: \['density', "
                                     r"'int8_mask', 'lambda', 'normalize', 'rescale', 'weight'\]"),
    ({"parameters": {"normalize": "yes"}}, r"parameters: normalize must be true or false, got the string 'yes'"),
    ({"parameters": {"lambda": [0.5, 1.0]}}, r"lambda is \[0.5, 1.0\]: mergekit gradients and per-layer filters are "
                                             r"not supported yet"),
    ({"parameters": {"lambda": [{"filter": "mlp", "value": 0.5}]}}, r"gradients and per-layer filters"),
    ({"dtype": "float8"}, r"mergekit dtype 'float8' is not supported; use one of \['float32', 'float16', 'bfloat16'\]"),
    ({"out_dtype": "int8"}, r"mergekit out_dtype 'int8' is not supported"),
    ({"tokenizer_source": "union"}, r"tokenizer_source 'union' is not supported .* use tokenizer_source: base"),
    ({"base_model": None}, r"mergekit ties needs base_model"),
]


@pytest.mark.parametrize("change,message", REJECTED)
def test_rejected_top_level(files, change, message):
    root, _, _ = files
    with pytest.raises(ParamError, match=message):
        mkc.translate({**mk(root), **change})


def test_rejected_model_entries(files):
    root, _, _ = files
    cfg = mk(root)
    cfg["models"][1]["layer_range"] = [0, 2]
    with pytest.raises(ParamError, match=r"models\[1\] has unsupported key\(s\) \['layer_range'\]; valid: \['model', 'parameters'\]"):
        mkc.translate(cfg)
    cfg = mk(root, per_model=({"weight": 1.0, "epsilon": 0.1}, {"weight": 1.0}))
    with pytest.raises(ParamError, match=r"per-model parameter\(s\) \['epsilon'\] are not supported for ties; "
                                         r"per-model: \['density', 'weight'\]"):
        mkc.translate(cfg)
    with pytest.raises(ParamError, match=r"ties needs weight for every model .* add parameters: \{weight: 1.0\}"):
        mkc.translate(mk(root, per_model=({"density": 0.5}, {"weight": 1.0})))
    with pytest.raises(ParamError, match=r"density must be > 0"):
        mkc.translate(mk(root, per_model=({"weight": 1.0, "density": 0.0}, {"weight": 1.0})))
    with pytest.raises(ParamError, match=r"weight must be a number, got the string '1'"):
        mkc.translate(mk(root, per_model=({"weight": "1"}, {"weight": 1.0})))
    cfg = mk(root)
    cfg["models"][0] = {"model": {"path": "x"}}
    with pytest.raises(ParamError, match=r"models\[0\].model must be one model path"):
        mkc.translate(cfg)


# ------------------------------------------------------------------------- end to end (saft-hf only)
def run_cli(root, cfg, capsys, name="out"):
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["merge", str(path), "--output", str(root / name), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_runs_a_mergekit_yaml(files, capsys):
    root, pre, fts = files
    cfg = mk(root, params={"lambda": 0.9}, dtype="float32", tokenizer_source="base")
    code, out, err = run_cli(root, cfg, capsys)
    assert code == 0, err
    assert "mergekit config (saved as mergekit_config.yml): merge_method ties runs as saft-hf ties" in out
    got = load_file(str(root / "out" / "model.safetensors"))
    want = merge_finetuned("ties", pre, fts, scaling=0.9, density=[0.5, 0.3], trim_scope="per_tensor",
                           trim_count="exact_min1", weights=[1.0, 0.5], zero_sign="positive")
    for k in SHAPES:
        assert torch.equal(got[k], want[k])
    assert yaml.safe_load((root / "out" / "mergekit_config.yml").read_text()) == cfg
    saved = yaml.safe_load((root / "out" / "merge_config.yaml").read_text())
    assert saved["method"] == "ties" and saved["params"]["trim_count"] == "exact_min1"
    report = json.loads((root / "out" / "merge_report.json").read_text())
    assert report["params"]["weights"] == [1.0, 0.5]


def test_cli_reports_mergekit_errors(files, capsys):
    root, _, _ = files
    code, _, err = run_cli(root, {**mk(root), "slices": []}, capsys)
    assert code == 1 and "saft-hf merge: error: mergekit config key(s) ['slices'] are not supported" in err


def test_help_mentions_mergekit(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    assert "mergekit YAML" in out and "dare_linear" in out and "trim_count" in out


# -------------------------------------------------------------- saft-hf's own format: config gaps
@pytest.mark.parametrize("entry,bad", [
    ({"path": "x", "parameters": {"weight": 1.0}}, "parameters"),
    ({"path": "x", "density": 0.5}, "density"),
    ({"model": "x"}, "model"),
])
def test_unknown_keys_in_models_entries_are_rejected(entry, bad):
    with pytest.raises(ValueError, match=rf"models\[0\] has unknown key\(s\) \['{bad}'\]; allowed: name, path. "
                                         r"Per-model settings go in `params:` as lists"):
        MergeConfig.from_dict({"pretrained": "p", "models": [entry, "y"], "method": "ties"})


def test_per_model_params_in_saft_format(files):
    root, pre, fts = files
    cfg = {"pretrained": str(root / "pre.safetensors"), "models": [str(root / "ft0.safetensors"), str(root / "ft1.safetensors")],
           "method": "ties", "params": {"density": [0.5, 0.3], "weights": [1.0, 0.5], "trim_scope": "per_tensor"}}
    MergeConfig.from_dict(cfg)
    with pytest.raises(ParamError, match="ties density has 3 values but there are 2 task vectors"):
        MergeConfig.from_dict({**cfg, "params": {"density": [0.5, 0.3, 0.1]}})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_out_dtype(files, dtype):
    root, pre, fts = files
    cfg = {"pretrained": str(root / "pre.safetensors"), "models": [str(root / "ft0.safetensors"), str(root / "ft1.safetensors")],
           "method": "task_arithmetic", "params": {"scaling": 0.3}, "out_dtype": dtype}
    report = merge_models(cfg, root / f"out_{dtype}", progress=False)
    got = load_file(str(root / f"out_{dtype}" / "model.safetensors"))
    want = merge_finetuned("task_arithmetic", pre, fts, scaling=0.3)  # float32
    for k in SHAPES:
        assert got[k].dtype == getattr(torch, dtype)
        assert torch.equal(got[k], want[k].to(getattr(torch, dtype)))  # rounded once, from float32
    assert any(f"written as {dtype}" in n for n in report["notes"])


def test_out_dtype_rejected():
    with pytest.raises(ValueError, match=r"out_dtype must be one of \['float16', 'bfloat16', 'float32'\]"):
        MergeConfig.from_dict({"pretrained": "p", "models": ["x"], "out_dtype": "fp8"})
