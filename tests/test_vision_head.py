"""Zero-shot heads from the CLIP text tower: equal to a direct computation, cached on disk by key."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPModel

from saft_hf.tasks.vision import get_vision_task
from saft_hf.vision.model import build_zero_shot_head, head_cache_path
from saft_hf.testing.vision import build_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_head_equals_direct_computation(tiny_clip, tmp_path):
    task = get_vision_task("dtd")
    classes = ["banded", "dotted", "zigzagged"]
    head = build_zero_shot_head(str(tiny_clip), task, classes, cache_dir=tmp_path, device="cpu")
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    rows = []
    with torch.no_grad():
        for name in classes:
            batch = tok([t.format(name) for t in task.templates], padding=True, return_tensors="pt")
            pooled = clip.text_model(**batch).pooler_output
            emb = F.normalize(clip.text_projection(pooled), dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=-1))
    expected = torch.stack(rows) * clip.logit_scale.exp()
    assert head.weight.shape == (3, clip.config.projection_dim)
    torch.testing.assert_close(head.weight, expected, rtol=1e-5, atol=1e-5)
    assert not any(True for _ in head.parameters())  # frozen: a buffer, never a parameter


def test_head_cache_is_used_and_keyed_by_templates_and_classes(tiny_clip, tmp_path, monkeypatch):
    task = get_vision_task("eurosat")
    first = build_zero_shot_head(str(tiny_clip), task, ["forest", "river"], cache_dir=tmp_path, device="cpu")
    path = head_cache_path(str(tiny_clip), task, ["forest", "river"], tmp_path)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left

    def no_model(*args, **kwargs):
        raise AssertionError("the cached head should have been used")

    monkeypatch.setattr(CLIPModel, "from_pretrained", no_model)
    again = build_zero_shot_head(str(tiny_clip), task, ["forest", "river"], cache_dir=tmp_path, device="cpu")
    torch.testing.assert_close(again.weight, first.weight)
    other_templates = dataclasses.replace(task, templates=("{}",))
    assert head_cache_path(str(tiny_clip), other_templates, ["forest", "river"], tmp_path) != path
    assert head_cache_path(str(tiny_clip), task, ["river", "forest"], tmp_path) != path
    assert head_cache_path(str(tiny_clip), get_vision_task("dtd"), ["forest", "river"], tmp_path) != path
