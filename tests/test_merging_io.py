"""On-disk merging: sharded safetensors round trip, from_pretrained of the output, clear errors
with nothing left behind, LoRA adapters, T5 tied embeddings, and the `saft-hf merge` CLI."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration  # noqa: E402

from saft_hf.merging import (  # noqa: E402
    CheckpointError, merge_models, task_arithmetic, task_vector, ties_merging, weighted_average,
)


def tiny_bert(seed):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=24)
    return BertModel(cfg).eval()


def perturbed(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    pre = tiny_bert(0)
    pre.save_pretrained(root / "pre", max_shard_size="20KB")
    paths = []
    for i in range(2):
        ft = perturbed(tiny_bert(0), seed=10 + i)
        ft.save_pretrained(root / f"ft{i}", max_shard_size="30KB")
        paths.append(root / f"ft{i}")
    # a tokenizer-like file beside the base weights must be copied to the output
    (root / "pre" / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(40)))
    return root, root / "pre", paths


def load_sd(path):
    return {k: v.clone() for k, v in BertModel.from_pretrained(path).state_dict().items()}


def cfg_for(pre, fts, method="ties", **params):
    return {"pretrained": str(pre), "models": [{"path": str(p), "name": p.name} for p in fts], "method": method,
            "params": params, "max_shard_size": "15KB"}


@pytest.mark.parametrize("method,params", [
    ("ties", {"scaling": 0.8, "density": 0.2}),
    ("ties", {"scaling": 0.5, "density": 0.3, "trim_scope": "per_tensor", "sign_method": "count", "disjoint": "sum"}),
    ("task_arithmetic", {"scaling": [0.3, 0.6]}),
    ("weighted_average", {"weights": [1, 3]}),
])
def test_disk_merge_equals_dict_api_and_loads(bert_dirs, tmp_path, method, params):
    _, pre_dir, ft_dirs = bert_dirs
    out = tmp_path / "merged"
    report = merge_models(cfg_for(pre_dir, ft_dirs, method, **params), out, progress=False)
    assert (out / "model.safetensors.index.json").exists() and len(report["shards"]) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report["shards"])
    assert (out / "config.json").exists() and (out / "vocab.txt").exists()
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "- merge" in card and method in card
    assert yaml.safe_load((out / "merge_config.yaml").read_text())["method"] == method
    merged = load_sd(out)
    pre, fts = load_sd(pre_dir), [load_sd(p) for p in ft_dirs]
    tvs = [task_vector(pre, f) for f in fts]
    if method == "ties":
        expect = ties_merging(pre, tvs, **params)
    elif method == "task_arithmetic":
        expect = task_arithmetic(pre, tvs, **params)
    else:
        expect = weighted_average(fts, params["weights"])
    for k in expect:
        torch.testing.assert_close(merged[k], expect[k], atol=1e-6, rtol=1e-6, msg=k)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_disk_merge_in_row_blocks_with_row_sampling(bert_dirs, tmp_path, monkeypatch):
    """Force row-block processing and row sampling (as for a big embedding) on the disk path."""
    from saft_hf.merging import engine

    monkeypatch.setattr(engine, "PIECE_ELEMENTS", 50)
    monkeypatch.setattr(engine, "_SMALL_TENSOR", 20)
    _, pre_dir, ft_dirs = bert_dirs
    out = tmp_path / "merged"
    cfg = cfg_for(pre_dir, ft_dirs, "ties", scaling=0.8, density=0.2)
    cfg["dare"] = {"drop_rate": 0.3, "seed": 3}
    merge_models(cfg, out, progress=False)
    merged = load_sd(out)
    pre, fts = load_sd(pre_dir), [load_sd(p) for p in ft_dirs]
    from saft_hf.merging import dare

    tvs = [dare(task_vector(pre, f), 0.3, seed=3 + i) for i, f in enumerate(fts)]
    expect = ties_merging(pre, tvs, scaling=0.8, density=0.2)
    for k in expect:
        torch.testing.assert_close(merged[k], expect[k], atol=1e-6, rtol=1e-6, msg=k)


def _expect_failure(cfg, out, match):
    with pytest.raises((CheckpointError, ValueError, KeyError), match=match):
        merge_models(cfg, out, progress=False)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_inputs_give_clear_errors_and_no_output(bert_dirs, tmp_path):
    root, pre_dir, ft_dirs = bert_dirs
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    _expect_failure(cfg_for(pre_dir, ft_dirs, density=1.5), out, r"density must be in \(0, 1\]")
    _expect_failure(cfg_for(pre_dir, ft_dirs, method="magic"), out, "unknown merge method")
    _expect_failure(cfg_for(pre_dir, ft_dirs, dencity=0.2), out, "unknown parameter")
    # missing key / dtype mismatch / shape mismatch: single-file checkpoints edited from the first one
    sd = load_sd(ft_dirs[0])
    missing = dict(sd)
    del missing["encoder.layer.1.output.dense.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    _expect_failure(cfg_for(pre_dir, [tmp_path / "missing.safetensors"]), out, "encoder.layer.1.output.dense.weight")
    half = {k: v.half() if k == "pooler.dense.bias" else v for k, v in sd.items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    _expect_failure(cfg_for(pre_dir, [tmp_path / "half.safetensors"]), out, "dtype mismatch for 'pooler.dense.bias'")
    wrong = dict(sd, **{"embeddings.word_embeddings.weight": torch.zeros(41, 16)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    _expect_failure(cfg_for(pre_dir, [tmp_path / "wrong.safetensors"]), out, "shape mismatch for 'embeddings.word_embeddings.weight'")
    # corrupt file: a truncated shard
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ft_dirs[0], broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: 100])
    _expect_failure(cfg_for(pre_dir, [broken]), out, "corrupt or incomplete")
    _expect_failure(cfg_for(pre_dir, [tmp_path / "nope"]), out, "does not exist")
    # a failure in the middle of writing leaves nothing either
    assert load_file(str(tmp_path / "missing.safetensors"))


def test_bin_checkpoints_are_read(bert_dirs, tmp_path):
    _, pre_dir, ft_dirs = bert_dirs
    sd = load_sd(ft_dirs[0])
    torch.save(sd, tmp_path / "pytorch_model.bin")
    out = tmp_path / "merged"
    merge_models(cfg_for(pre_dir, [tmp_path / "pytorch_model.bin"], "task_arithmetic", scaling=1.0), out, progress=False)
    merged = load_sd(out)
    for k in sd:
        torch.testing.assert_close(merged[k], sd[k], atol=1e-6, rtol=1e-6)


def test_lora_adapter_merges_full_delta(bert_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model

    _, pre_dir, _ = bert_dirs
    base = BertModel.from_pretrained(pre_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    out = tmp_path / "merged"
    report = merge_models(cfg_for(pre_dir, [tmp_path / "adapter"], "task_arithmetic", scaling=1.0), out, progress=False)
    assert any("B@A*scale" in n for n in report["notes"])
    assert "B@A*scale" in (out / "README.md").read_text()
    merged = load_sd(out)
    pre = load_sd(pre_dir)
    changed = [k for k in expected if not torch.equal(expected[k], pre[k])]
    assert changed and all("query" in k or "value" in k for k in changed)
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], atol=1e-6, rtol=1e-6, msg=k)


def tiny_t5(seed):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=32, d_model=8, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=4,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def test_t5_tied_embeddings_merged_once(tmp_path):
    pre = tiny_t5(0)
    pre.save_pretrained(tmp_path / "pre", max_shard_size="10KB")
    fts = []
    for i in range(2):
        ft = perturbed(tiny_t5(0), seed=20 + i)  # perturbs shared once (tied in memory)
        ft.save_pretrained(tmp_path / f"ft{i}")
        fts.append(ft)
    # in memory: the tied group is found by storage and merged once
    pre_sd, ft_sds = pre.state_dict(), [f.state_dict() for f in fts]
    tvs = [task_vector(pre_sd, s) for s in ft_sds]
    merged_mem = ties_merging(pre_sd, tvs, scaling=1.0, density=0.2)
    assert merged_mem["shared.weight"].data_ptr() == merged_mem["lm_head.weight"].data_ptr()
    # also a .bin fine-tuned checkpoint that stores every tied copy: recognised as tied, not an error
    torch.save({k: v.clone() for k, v in ft_sds[1].items()}, tmp_path / "ft1_all_keys.bin")
    out = tmp_path / "merged"
    cfg = {"pretrained": str(tmp_path / "pre"), "models": [str(tmp_path / "ft0"), str(tmp_path / "ft1_all_keys.bin")],
           "method": "ties", "params": {"scaling": 1.0, "density": 0.2}, "max_shard_size": "10KB"}
    report = merge_models(cfg, out, progress=False)
    assert any("tied copy" in n for n in report["notes"])
    loaded = T5ForConditionalGeneration.from_pretrained(out)
    sd = loaded.state_dict()
    assert sd["shared.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
    for k in ("shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"):
        torch.testing.assert_close(sd[k], merged_mem[k], atol=1e-6, rtol=1e-6)


def test_cli_merge(bert_dirs, tmp_path, capsys):
    from saft_hf.cli import main

    _, pre_dir, ft_dirs = bert_dirs
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(cfg_for(pre_dir, ft_dirs, "ties", scaling=0.5, density=0.3)))
    out = tmp_path / "merged"
    assert main(["merge", str(cfg), "--output", str(out), "--no-progress"]) == 0
    assert "merged" in capsys.readouterr().out
    model = BertModel.from_pretrained(out)
    assert model.config.hidden_size == 16
    # second run without --overwrite refuses, with a clear message
    assert main(["merge", str(cfg), "--output", str(out), "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(cfg), "--output", str(out), "--no-progress", "--overwrite"]) == 0


def test_cli_help_has_example(capsys):
    from saft_hf.cli import main

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    assert "example config" in text and "density" in text and "--output" in text


def test_example_recipes_parse():
    from pathlib import Path

    from saft_hf.merging import MergeConfig

    files = sorted(Path(__file__).resolve().parents[1].joinpath("recipes", "merge_examples").glob("*.yaml"))
    assert files
    for f in files:
        MergeConfig.from_yaml(f)


@pytest.mark.slow
def test_benchmark_script_small_scale_matches_reference():
    """The benchmark at a tiny scale: the streamed TIES output equals the flatten reference exactly."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "benchmarks" / "bench_ties_merge.py"
    res = subprocess.run([sys.executable, str(script), "--scale", "0.02", "--tasks", "3"], capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["max_abs_diff"] == 0.0
    assert summary["stream"]["peak_rss_mb"] > 0 and summary["reference"]["peak_rss_mb"] > 0
