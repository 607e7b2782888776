"""Every method of issue 13 through `saft-hf merge` (YAML on disk, streamed, sharded output)
equals the in-memory function bit for bit - including the example recipes' method and params
(recipes/merge_examples), forced row blocks for the methods that allow them, and SLERP without
a pretrained model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from saft_hf.cli import main
from saft_hf.merging import engine, merge, merge_finetuned, registry

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "merge_examples"
SHAPES = {
    "visual.conv1.weight": (6, 3, 2, 2),
    "visual.positional_embedding": (5, 6),
    "visual.transformer.resblocks.0.attn.in_proj_weight": (18, 6),
    "visual.transformer.resblocks.0.attn.in_proj_bias": (18,),
    "visual.transformer.resblocks.0.ln_1.weight": (6,),
    "visual.transformer.resblocks.0.mlp.c_fc.weight": (24, 6),
    "visual.transformer.resblocks.11.mlp.c_proj.weight": (6, 24),
    "visual.proj": (6, 4),
}


def write_models(root: Path, num: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    pre["position_ids"] = torch.arange(5)
    save_file(pre, str(root / "pre.safetensors"))
    fts = []
    for i in range(num):
        common = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()} if i == 0 else common
        ft = {k: pre[k] + 0.05 * (common[k] + torch.randn(s, generator=g)) for k, s in SHAPES.items()}
        ft["position_ids"] = pre["position_ids"].clone()
        save_file(ft, str(root / f"ft{i}.safetensors"))
        fts.append(ft)
    return pre, fts


def run_cli(root: Path, cfg: dict, name="out") -> dict:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = root / name
    assert main(["merge", str(path), "--output", str(out), "--no-progress"]) == 0
    merged = {}
    for f in sorted(out.glob("*.safetensors")):
        merged.update(load_file(str(f)))
    return merged


def in_memory(method, pre, fts, params, transforms=None, with_pretrained=True):
    m = registry.get_method(method)
    if not m.needs_pretrained:
        return merge_finetuned(method, pre if with_pretrained else None, fts, transforms, **params)
    tvs = [{k: ft[k] - pre[k] for k in SHAPES} for ft in fts]
    return merge(method, pre, tvs, transforms, **params)


def assert_identical(disk: dict, mem: dict):
    assert set(disk) == set(mem)
    for k in mem:
        assert disk[k].dtype == mem[k].dtype and torch.equal(disk[k], mem[k]), k


CASES = [
    ("tsv_merging", {"scaling": 0.9}, 3),
    ("iso_c", {"scaling": 1.2}, 3),
    ("iso_cts", {"scaling": 1.4, "common_space_fraction": 0.5}, 3),
    ("breadcrumbs", {"scaling": [0.3, 0.5, 0.4], "density": 0.3, "beta": 0.05}, 3),
    ("della", {"scaling": 0.8, "density": 0.5, "epsilon": 0.2, "seed": 4}, 3),
    ("model_stock", {"filter_wise": True}, 3),
    ("slerp", {"t": 0.3}, 2),
    ("task_arithmetic", {"scaling": [{"pattern": "resblocks\\.11\\.", "value": [0.1, 0.2, 0.3]},
                                     {"glob": "*ln_*", "value": 1.0}, {"value": [0.4, 0.3, 0.2]}]}, 3),
    ("ties", {"density": 0.4, "scaling": [{"glob": "visual.proj", "value": 0.2}, {"value": 0.7}]}, 3),
]


@pytest.mark.parametrize("method,params,num", CASES, ids=[c[0] for c in CASES])
def test_cli_equals_in_memory_bit_for_bit(tmp_path, method, params, num):
    pre, fts = write_models(tmp_path, num)
    cfg = {"pretrained": str(tmp_path / "pre.safetensors"), "method": method, "params": params,
           "models": [str(tmp_path / f"ft{i}.safetensors") for i in range(num)]}
    with_pretrained = registry.get_method(method).needs_pretrained  # SLERP: the two models alone
    if not with_pretrained:
        del cfg["pretrained"]
    assert_identical(run_cli(tmp_path, cfg), in_memory(method, pre, fts, params, with_pretrained=with_pretrained))


@pytest.mark.parametrize("method,params", [("breadcrumbs", {"density": 0.3}), ("della", {"seed": 2}),
                                           ("task_arithmetic", {"scaling": [{"pattern": "mlp", "value": 0.5},
                                                                            {"value": 0.2}]})])
def test_row_blocks_give_the_same_merge(tmp_path, monkeypatch, method, params):
    """The on-disk run splits every tensor above 8 entries into row blocks (transforms then
    work on the cached whole tensor); the in-memory run does not: identical outputs."""
    pre, fts = write_models(tmp_path, 3, seed=1)
    mem = in_memory(method, pre, fts, params)
    monkeypatch.setattr(engine, "PIECE_ELEMENTS", 8)
    cfg = {"pretrained": str(tmp_path / "pre.safetensors"), "method": method, "params": params,
           "models": [str(tmp_path / f"ft{i}.safetensors") for i in range(3)]}
    assert_identical(run_cli(tmp_path, cfg), mem)


def test_magprune_transform_in_front_of_ties_on_disk(tmp_path):
    pre, fts = write_models(tmp_path, 3, seed=2)
    cfg = {"pretrained": str(tmp_path / "pre.safetensors"), "method": "ties", "params": {"density": 1.0},
           "transforms": [{"name": "magprune", "density": 0.6, "epsilon": 0.1, "seed": 5}],
           "models": [str(tmp_path / f"ft{i}.safetensors") for i in range(3)]}
    disk = run_cli(tmp_path, cfg)
    assert_identical(disk, in_memory("ties", pre, fts, {"density": 1.0},
                                     [{"name": "magprune", "density": 0.6, "epsilon": 0.1, "seed": 5}]))


def test_slerp_without_pretrained_on_disk(tmp_path):
    pre, fts = write_models(tmp_path, 2, seed=3)
    cfg = {"method": "slerp", "params": {"t": 0.7},
           "models": [str(tmp_path / "ft0.safetensors"), str(tmp_path / "ft1.safetensors")]}
    assert_identical(run_cli(tmp_path, cfg), in_memory("slerp", pre, fts, {"t": 0.7}, with_pretrained=False))


def test_slerp_with_three_models_is_refused_before_writing(tmp_path, capsys):
    write_models(tmp_path, 3)
    cfg = {"method": "slerp", "models": [str(tmp_path / f"ft{i}.safetensors") for i in range(3)]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(path), "--output", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "slerp merges exactly 2 models (task vectors), got 3" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


NEW_RECIPES = ["tsv_vit_b32", "iso_c_vit_b32", "iso_cts_vit_b32", "breadcrumbs_vit_b32", "della_vit_b32",
               "model_stock_vit_b32", "slerp_two_models", "ties_per_layer_vit_b32"]


@pytest.mark.parametrize("recipe", NEW_RECIPES)
def test_example_recipe_runs_on_small_models(tmp_path, recipe):
    """Each example YAML's method and params, pointed at small checkpoints of the same names."""
    raw = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())
    num = len(raw["models"])
    pre, fts = write_models(tmp_path, num, seed=4)
    raw["models"] = [{"name": m["name"], "path": str(tmp_path / f"ft{i}.safetensors")}
                     for i, m in enumerate(raw["models"])]
    if "pretrained" in raw:
        raw["pretrained"] = str(tmp_path / "pre.safetensors")
    disk = run_cli(tmp_path, raw)
    mem = in_memory(raw["method"], pre, fts, raw.get("params", {}), with_pretrained="pretrained" in raw)
    assert_identical(disk, mem)
    changed = [k for k in SHAPES if not torch.equal(disk[k], pre[k])]
    assert changed, "the merge changed nothing"
