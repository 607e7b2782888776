"""`saft-hf analyze --family demo`: the demo's task data and heads, rebuilt the way the checkpoints were
trained (logit scale / max length read from their training records), on a tiny BERT with a WordPiece vocab."""
from __future__ import annotations

import json
import random

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread_torch")

WORDS = ["red", "blue", "apple", "sky", "sea", "fire", "good", "bad", "film", "a", "the", "is", "this", "thing", "."]


def _texts(words0, words1, n, seed):
    rng = random.Random(seed)
    return [(" ".join(rng.sample(words1 if i % 2 else words0, 2) + ["a", "thing"]), i % 2) for i in range(n)]


def test_analyze_demo_family(tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel, BertTokenizer

    from saft_hf.cli import main
    from saft_hf.demo import study
    from saft_hf.tasks.text_demo import TextTask

    base = tmp_path / "base"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(base)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(base)
    for method in ("adamw", "asam"):
        for k, task in enumerate(("color", "mood")):
            torch.manual_seed(10 + k + (5 if method == "asam" else 0))
            ft = BertModel.from_pretrained(base)
            with torch.no_grad():
                for p in ft.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            d = tmp_path / "ckpts" / f"{method}-seed0" / task
            ft.save_pretrained(d)
            (d / "saft_demo_training.json").write_text(json.dumps({"signature": {"logit_scale": 10.0, "max_length": 16}}))

    color = TextTask(name="color", title="toy", source="none", member="", class_names=("red", "blue"),
                     templates=("a {} thing .",), description="toy", raw_labels=("0", "1"))
    mood = TextTask(name="mood", title="toy", source="none", member="", class_names=("bad", "good"),
                    templates=("this film is {} .",), description="toy", raw_labels=("0", "1"))
    override = {"color": (color, {"all": _texts(["red", "fire", "apple"], ["blue", "sky", "sea"], 150, 0)}),
                "mood": (mood, {"all": _texts(["bad", "fire"], ["good", "sky"], 150, 1)})}
    seen = {}
    original = study.prepare_tasks

    def prepare_with_toy_data(cfg, cache_dir):  # the real loaders would fetch public data sets
        cfg.task_data_override = override
        seen["logit_scale"], seen["max_length"] = cfg.logit_scale, cfg.max_length
        return original(cfg, cache_dir)

    monkeypatch.setattr(study, "prepare_tasks", prepare_with_toy_data)
    out = tmp_path / "out"
    rc = main(["analyze", "--pretrained", str(base), "--checkpoints-root", str(tmp_path / "ckpts"),
               "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--subset-size", "8",
               "--grid-size", "5", "--analyses", "disentanglement", "linearity", "--no-progress"])
    assert rc == 0
    assert seen == {"logit_scale": 10.0, "max_length": 16}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["adamw", "asam"]
    assert summary["probe"]["tasks"] == ["color", "mood"] and summary["probe"]["examples"] == {"color": 8, "mood": 8}
    plane = json.loads((out / "plane_two-task.json").read_text())
    assert plane["asam"]["tasks"] == ["color", "mood"]
    assert plane["asam"]["xi"]["disagreement"][1][1] == 0.0  # (0, 0): both tasks on their references
    assert (out / "linearity.png").exists() and not (out / "plane_all-task.json").exists()  # two tasks only
