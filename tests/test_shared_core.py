"""Shared building blocks: atomic writes, zero-shot heads, the evaluation summary, the CLI dispatcher."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from saft_hf import cli
from saft_hf.evaluation import markdown_table, normalized_accuracy, summarize
from saft_hf.heads import EncoderClassifier, ZeroShotHead, zero_shot_weights
from saft_hf import io_utils
from saft_hf.io_utils import OutputError, atomic_directory, atomic_path, check_output, leftovers, write_json_atomic


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


def _tree(root):
    return sorted(str(p.relative_to(root)) + (":" + p.read_text() if p.is_file() else "") for p in root.rglob("*"))


def test_outputs_overlapping_inputs_are_refused_even_with_overwrite(tmp_path):
    models = tmp_path / "models"
    (models / "pre").mkdir(parents=True)
    (models / "pre" / "w.bin").write_text("weights")
    (tmp_path / "link").symlink_to(models / "pre")
    (tmp_path / "single.bin").write_text("a single-file input")
    inputs = [models / "pre", tmp_path / "single.bin"]
    before = _tree(tmp_path)
    for out, relation in [(models / "pre", "is the input"), (models, "contains the input"),
                          (models / "pre" / "sub", "lies inside the input"), (tmp_path / "link", "resolves to"),
                          (tmp_path / "single.bin", "is the input"),
                          (models / "pre" / "w.bin", "lies inside the input")]:
        for overwrite in (False, True):
            with pytest.raises(OutputError, match=relation):
                with atomic_directory(out, overwrite=overwrite, inputs=inputs):
                    pass
        with pytest.raises(OutputError, match=relation):
            with atomic_path(out, inputs=inputs):
                pass
    assert _tree(tmp_path) == before


def test_check_output_creates_nothing_and_names_the_problem(tmp_path):
    assert check_output(tmp_path / "a" / "b" / "out") == tmp_path / "a" / "b" / "out"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        check_output(tmp_path / "file" / "out")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="symbolic link to .*nowhere, which does not exist"):
        check_output(tmp_path / "dangling")
    with pytest.raises(FileExistsError, match="already exists"):
        check_output(tmp_path / "file")
    with pytest.raises(OutputError, match="is a directory; give a file name"):
        check_output(tmp_path, overwrite=True, directory=False)


def test_failed_write_removes_the_parents_it_created(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "a" / "b" / "out") as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "c" / "d.json") as tmp:
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_umask_permissions(tmp_path):
    import stat

    old = os.umask(0o027)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            write_json_atomic(tmp / "report.json", {"a": 1})
        with atomic_path(tmp_path / "single.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "out" / "report.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "single.txt").stat().st_mode) == 0o640


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_removed_or_reported(tmp_path, caplog):
    dead, alive = _dead_pid(), os.getppid()
    stale_dir = tmp_path / f".out.{dead}-0123abcd.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x" * 100)
    stale_old = tmp_path / f".out.{dead}-89abcdef.old"
    stale_old.symlink_to(tmp_path / "somewhere")
    alive_dir = tmp_path / f".out.{alive}-0123abcd.tmp"
    alive_dir.mkdir()
    legacy = tmp_path / ".out.k2j3h4g5.tmp"
    legacy.mkdir()
    assert leftovers(tmp_path / "out") == sorted([stale_dir, stale_old, alive_dir, legacy])
    with caplog.at_level("WARNING", logger="saft_hf.io_utils"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "a").write_text("new")
    assert not os.path.lexists(stale_dir) and not os.path.lexists(stale_old)
    assert alive_dir.exists() and legacy.exists()  # not provably stale: reported, not deleted
    assert f"removed {stale_dir}" in caplog.text
    assert f"found {alive_dir}, owned by process {alive}" in caplog.text
    assert f"found {legacy}, probably left behind" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive_dir.name, legacy.name])


def test_concurrent_writer_without_overwrite_fails_at_once(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_text("first")
        with pytest.raises(OutputError, match=r"another run \(process \d+\) is writing .*out right now"):
            with atomic_directory(tmp_path / "out"):
                pass
    assert (tmp_path / "out" / "a").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("native", [True, False], ids=["renameat2", "fallback"])
def test_final_rename_never_replaces_without_overwrite(tmp_path, monkeypatch, native):
    if not native:  # systems / filesystems without renameat2: mkdir placeholder + rename, two renames
        monkeypatch.setattr(io_utils, "_renameat2", lambda *a: False)
    for user_content in (None, "mine"):
        out = tmp_path / f"out_{user_content}"
        with pytest.raises(FileExistsError, match="created by someone else"):
            with atomic_directory(out) as tmp:
                (tmp / "a").write_text("merged")
                out.mkdir()  # someone creates the output meanwhile
                if user_content:
                    (out / "user.txt").write_text(user_content)
        assert sorted(p.name for p in out.iterdir()) == (["user.txt"] if user_content else [])
    # --overwrite replaces a directory, a file and a symlink (not its target); nothing is left
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep").write_text("keep")
    (tmp_path / "as_link").symlink_to(tmp_path / "target")
    (tmp_path / "as_file").write_text("old")
    for name in ("out_mine", "as_link", "as_file"):
        with atomic_directory(tmp_path / name, overwrite=True) as tmp:
            (tmp / "a").write_text("new")
        assert (tmp_path / name / "a").read_text() == "new" and not (tmp_path / name).is_symlink()
    assert (tmp_path / "target" / "keep").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["as_file", "as_link", "out_None", "out_mine", "target"]


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
