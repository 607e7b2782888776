"""Shared building blocks: atomic writes, zero-shot heads, the evaluation summary, the CLI dispatcher."""
import json

import pytest
import torch
import torch.nn.functional as F

from saft_hf import cli
from saft_hf.evaluation import markdown_table, normalized_accuracy, summarize
from saft_hf.heads import EncoderClassifier, ZeroShotHead, zero_shot_weights
from saft_hf.io_utils import atomic_directory, atomic_path, write_json_atomic


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_commit_and_overwrite(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(target):
            pass
    with pytest.raises(ValueError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("two")
            raise ValueError("crash")
    assert (target / "a.txt").read_text() == "one"  # old content survives a failed overwrite
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_write_json_atomic_converts_tensor_scalars(tmp_path):
    write_json_atomic(tmp_path / "r.json", {"acc": torch.tensor(0.5), "path": tmp_path})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data == {"acc": 0.5, "path": str(tmp_path)}


def test_zero_shot_weights_match_direct_computation():
    torch.manual_seed(0)
    table = {}

    def embed(texts):
        for t in texts:
            table.setdefault(t, torch.randn(8))
        return torch.stack([table[t] for t in texts])

    classes, templates = ["cat", "dog"], ["a photo of a {}.", "{c} picture"]
    w = zero_shot_weights(embed, classes, templates, logit_scale=100.0)
    for i, c in enumerate(classes):
        prompts = [f"a photo of a {c}.", f"{c} picture"]
        emb = torch.stack([F.normalize(table[p], dim=0) for p in prompts]).mean(0)
        torch.testing.assert_close(w[i], 100.0 * F.normalize(emb, dim=0))
    with pytest.raises(ValueError, match="placeholder"):
        zero_shot_weights(embed, classes, ["no slot"], 1.0)


def test_head_is_frozen_buffer_and_round_trips(tmp_path):
    head = ZeroShotHead(torch.randn(3, 4))
    assert list(head.parameters()) == []
    feats = torch.randn(5, 4)
    torch.testing.assert_close(head(feats), F.normalize(feats, dim=-1) @ head.weight.t())
    head.save(tmp_path / "head.safetensors")
    torch.testing.assert_close(ZeroShotHead.load(tmp_path / "head.safetensors").weight, head.weight)


def test_encoder_classifier_trains_only_the_encoder():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = EncoderClassifier(BertModel(cfg), ZeroShotHead(torch.randn(2, 16)), "mean_pooled_text")
    assert all(name.startswith("encoder.") for name, _ in model.named_parameters())
    ids = torch.randint(0, 50, (3, 7))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0]))
    assert out["logits"].shape == (3, 2) and out["loss"].ndim == 0
    with pytest.raises(ValueError, match="unknown feature function"):
        EncoderClassifier(BertModel(cfg), ZeroShotHead(torch.randn(2, 16)), "cls")


def test_summarize_normalizes_and_tables():
    rep = summarize({"a": 0.5, "b": 0.9}, {"a": 1.0, "b": 0.9})
    assert rep["normalized"] == {"a": 0.5, "b": 1.0}
    assert rep["absolute_mean"] == pytest.approx(0.7) and rep["normalized_mean"] == pytest.approx(0.75)
    table = markdown_table({"merged": rep})
    assert "| merged | 50.00 | 90.00 | 70.00 | 75.00 |" in table
    with pytest.raises(KeyError, match="'b'"):
        summarize({"a": 0.5, "b": 0.9}, {"a": 1.0})
    with pytest.raises(ValueError):
        normalized_accuracy(0.5, 0.0)


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "merge" in capsys.readouterr().out
