"""Shared pieces of the hostile-input tests (issue 11) of `evaluate`, `analyze` and `demo`: tiny
models of the wrong and right architectures, the "inputs unchanged, nothing left behind" check,
one-line error checks, and a tmpfs mount for the read-only / full filesystem test."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import torch

LEFTOVER = re.compile(r"\.(tmp|old|lock)$")
WORDS = ["red", "blue", "apple", "sky", "sea", "fire", "good", "bad", "film", "a", "the", "is", "this", "thing", "."]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


@dataclasses.dataclass
class Case:
    id: str
    setup: Callable[[Path], list]  # workspace -> argv after the command name
    code: int
    fragment: str  # must be in the single error line
    output: str = "out"  # relative to the workspace; must not be created by a failed run
    check: Callable[[Path, str], None] | None = None


# ----------------------------------------------------------------------------------------------
# tiny models


def tiny_bert(path: Path, seed: int = 0, tokenizer: bool = True) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    if tokenizer:
        BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(path)
    return path


def tiny_vit(path: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16)).save_pretrained(path)
    return path


def tiny_t5_dir(path: Path) -> Path:
    from saft_hf.testing.glue import tiny_t5, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_t5(tok, d_model=16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def toy_texts(words0, words1, n, seed):
    rng = random.Random(seed)
    return [(" ".join(rng.sample(words1 if i % 2 else words0, 2) + ["a", "thing"]), i % 2) for i in range(n)]


def toy_tasks() -> dict:
    """Two toy text tasks in the demo's `task_data_override` form (no data fetch)."""
    from saft_hf.tasks.text_demo import TextTask

    color = TextTask(name="polarity", title="toy", source="none", member="", class_names=("red", "blue"),
                     templates=("a {} thing .",), description="toy", raw_labels=("0", "1"))
    mood = TextTask(name="uncertainty", title="toy", source="none", member="", class_names=("bad", "good"),
                    templates=("this film is {} .",), description="toy", raw_labels=("0", "1"))
    return {"polarity": (color, {"all": toy_texts(["red", "fire", "apple"], ["blue", "sky", "sea"], 60, 0)}),
            "uncertainty": (mood, {"all": toy_texts(["bad", "fire"], ["good", "sky"], 60, 1)})}


# ----------------------------------------------------------------------------------------------
# checks


def snapshot(root: Path, skip: Path | None = None) -> dict:
    """Every entry under `root` (links not followed) -> content hash / link target / 'dir'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if skip is not None and (d == skip or skip in d.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = d / name
            if skip is not None and p == skip:
                continue
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftover_entries(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if LEFTOVER.search(n)]
    return found


def error_lines(err: str, command: str) -> list[str]:
    """`saft-hf COMMAND: error:` lines (`saft-hf evaluate FAMILY: error:` for evaluate)."""
    pattern = re.compile(rf"saft-hf {re.escape(command)}( [a-z]+)?: error: ")
    return [line for line in err.splitlines() if pattern.match(line)]


def run_case(case: Case, ws: Path, command: list[str], capsys, main) -> str:
    """Run one table case; check exit code, the single error line, inputs unchanged, nothing left."""
    argv = case.setup(ws)
    out = ws / case.output
    existed = os.path.lexists(out)
    before = snapshot(ws)
    code = main([*command, *argv])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == case.code, text
    assert "Traceback" not in text
    lines = error_lines(captured.err, command[0])
    assert len(lines) == 1, captured.err
    assert case.fragment in lines[0], lines[0]
    assert os.path.lexists(out) == existed, "a failed run must not create its output"
    if case.check:
        case.check(ws, lines[0])
    assert snapshot(ws) == before, "inputs changed"
    assert leftover_entries(ws) == []
    return lines[0]


# ----------------------------------------------------------------------------------------------
# tmpfs (root only)


class Tmpfs:
    """`mount(options)` mounts a fresh tmpfs under `root` and returns it; `close()` unmounts all."""

    def __init__(self, root: Path, skip):
        if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
            skip("mounting a tmpfs needs root")
        self.root, self.skip, self.mounted = root, skip, []

    def mount(self, options: str = "size=1m") -> Path:
        point = self.root / f"fs{len(self.mounted)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if r.returncode:
            self.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
        self.mounted.append(point)
        return point

    def close(self) -> None:
        for point in reversed(self.mounted):
            subprocess.run(["umount", str(point)], check=False)


def fill(directory: Path, leave: int = 8192) -> Path:
    """Fill the filesystem of `directory` with one file, leaving about `leave` bytes free."""
    filler = directory / "user-data.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\1" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler
