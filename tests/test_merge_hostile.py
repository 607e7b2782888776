"""Hostile input for `saft-hf merge` (issue 11): every case gives its exit code and one
`saft-hf merge: error:` line naming the input and the fix, and after every case the inputs are
byte-for-byte unchanged and nothing is left behind (no output, no .tmp/.old/.lock entries).
Also: concurrent merges to one output, a merge killed with SIGKILL, output permissions, too many
shards for the open-file limit, and a read-only / full filesystem (tmpfs, root only)."""
from __future__ import annotations

import dataclasses
import gc
import json
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from saft_hf.cli import main  # noqa: E402
from saft_hf.io_utils import leftovers  # noqa: E402
from saft_hf.merging.io import ShardedSafetensorsSink  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
from _hostile import leftover_entries, snapshot  # noqa: E402
ERROR = "saft-hf merge: error:"


# ----------------------------------------------------------------------------------------------
# tiny checkpoints


def tiny_bert(seed, hidden=16):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=24)
    return BertModel(cfg).eval()


def perturbed(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """models/pre (sharded, with vocab.txt), models/ft0, models/ft1, models/adapter (LoRA)."""
    root = tmp_path_factory.mktemp("hostile_template")
    models = root / "models"
    tiny_bert(0).save_pretrained(models / "pre", max_shard_size="20KB")
    (models / "pre" / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(40)))
    for i in range(2):
        perturbed(tiny_bert(0), seed=10 + i).save_pretrained(models / f"ft{i}", max_shard_size="30KB")
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(BertModel.from_pretrained(models / "pre"),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["query"], init_lora_weights=False))
    peft_model.save_pretrained(models / "adapter")
    return root


@pytest.fixture
def ws(template, tmp_path):
    """A private copy of the template: cases may (try to) damage it."""
    shutil.copytree(template, tmp_path / "ws", symlinks=True)
    return tmp_path / "ws"


def state_dict(path) -> dict:
    return {k: v.clone() for k, v in BertModel.from_pretrained(path).state_dict().items()}


def write_cfg(ws: Path, name="cfg.yaml", pretrained="models/pre", models=("models/ft0", "models/ft1"),
              method="task_arithmetic", params=None, **extra) -> Path:
    cfg = {"pretrained": str(ws / pretrained) if pretrained else None,
           "models": [str(ws / m) for m in models], "method": method,
           "params": params if params is not None else {"scaling": 0.5}, "max_shard_size": "15KB", **extra}
    if cfg["pretrained"] is None:
        del cfg["pretrained"]
    path = ws / name
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------------------------
# "inputs unchanged, nothing left behind"


# snapshot / leftover_entries: the shared helpers of every hostile-input module (tests/_hostile.py)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(ERROR)]


# ----------------------------------------------------------------------------------------------
# the table


@dataclasses.dataclass
class Case:
    id: str
    setup: Callable[[Path], list]  # ws -> argv after "merge" (config, --output OUT, flags)
    code: int
    fragment: str  # in the error line (code 1) or stdout (code 0)
    output: str = "out"  # relative to ws; must not exist after a failure (unless it did before)
    check: Callable[[Path, str], None] | None = None  # extra check (ws, stdout+stderr)
    not_in: str | None = None  # must NOT be in the message


def _args(ws, cfg, out="out", *flags):
    return [str(cfg), "--output", str(ws / out), "--no-progress", *flags]


def _single_file_pretrained(ws):
    save_file(state_dict(ws / "models/pre"), str(ws / "pre.safetensors"))
    return _args(ws, write_cfg(ws, pretrained="pre.safetensors"))


def _single_file_with_config_key(ws):
    save_file(state_dict(ws / "models/pre"), str(ws / "pre.safetensors"))
    return _args(ws, write_cfg(ws, pretrained="pre.safetensors", config=str(ws / "models/pre")))


def _check_no_config(ws, text):
    assert not (ws / "out" / "config.json").exists()
    assert (ws / "out" / "model.safetensors.index.json").exists() or (ws / "out" / "model.safetensors").exists()


def _check_loads(ws, text):
    model = BertModel.from_pretrained(ws / "out")
    assert model.config.hidden_size == 16
    assert (ws / "out" / "vocab.txt").exists()


def _bin_with_metadata(ws):
    sd = state_dict(ws / "models/pre")
    torch.save({**sd, "epoch": 3}, ws / "pre.bin")
    return _args(ws, write_cfg(ws, pretrained="pre.bin"))


def _edited_ft(ws, key, tensor):
    sd = state_dict(ws / "models/ft0")
    sd[key] = tensor
    save_file(sd, str(ws / "edited.safetensors"))
    return _args(ws, write_cfg(ws, models=["edited.safetensors"]))


def _bad_adapter_config(ws):
    (ws / "models/adapter/adapter_config.json").write_text("{lora_alpha: 4,")
    return _args(ws, write_cfg(ws, models=["models/adapter"]))


def _adapter_without_lora_b(ws):
    f = ws / "models/adapter/adapter_model.safetensors"
    sd = load_file(str(f))
    drop = sorted(k for k in sd if "lora_B" in k)[0]
    save_file({k: v for k, v in sd.items() if k != drop}, str(f))
    return _args(ws, write_cfg(ws, models=["models/adapter"]))


def _symlink(ws, name, target):
    os.symlink(target, ws / name)
    return name


def _file_at(ws, name, text="user data\n"):
    (ws / name).write_text(text)
    return ws / name


def _user_dir(ws):
    (ws / "existing").mkdir()
    (ws / "existing" / "keep.txt").write_text("mine\n")
    return _args(ws, write_cfg(ws), "existing")


def _check_overwrote_link(ws, text):
    assert not (ws / "linked").is_symlink() and (ws / "linked" / "config.json").exists()
    assert (ws / "elsewhere" / "keep.txt").read_text() == "mine\n"  # the link's target is untouched


def _link_to_elsewhere(ws):
    (ws / "elsewhere").mkdir()
    (ws / "elsewhere" / "keep.txt").write_text("mine\n")
    return _args(ws, write_cfg(ws), _symlink(ws, "linked", ws / "elsewhere"), "--overwrite")


CASES = [
    # 1. outputs overlapping inputs, with or without --overwrite
    Case("out-is-pretrained-overwrite", lambda ws: _args(ws, write_cfg(ws), "models/pre", "--overwrite"), 1,
         "is the input", output="models/pre"),
    Case("out-is-pretrained", lambda ws: _args(ws, write_cfg(ws), "models/pre"), 1, "is the input",
         output="models/pre"),
    Case("out-contains-inputs-overwrite", lambda ws: _args(ws, write_cfg(ws), "models", "--overwrite"), 1,
         "contains the input", output="models"),
    Case("out-inside-input", lambda ws: _args(ws, write_cfg(ws), "models/pre/merged"), 1, "lies inside the input",
         output="models/pre/merged"),
    Case("out-symlink-to-input-overwrite",
         lambda ws: _args(ws, write_cfg(ws), _symlink(ws, "link", ws / "models/ft1"), "--overwrite"), 1,
         "resolves to", output="link"),
    Case("out-is-single-file-input-overwrite",
         lambda ws: (shutil.copy(sorted((ws / "models/ft0").glob("*.safetensors"))[0], ws / "w.safetensors"),
                     _args(ws, write_cfg(ws, models=["w.safetensors"]), "w.safetensors", "--overwrite"))[1],
         1, "is the input", output="w.safetensors"),
    # 12. tracebacks that must be one line
    Case("yaml-malformed", lambda ws: _args(ws, _file_at(ws, "bad.yaml", "models: [a, b\nmethod: ties\n")), 1,
         "is not valid YAML"),
    Case("config-is-directory", lambda ws: _args(ws, ws / "models"), 1, "is a directory; give the YAML file"),
    Case("config-missing", lambda ws: _args(ws, ws / "nope.yaml"), 1, "not found"),
    Case("bin-with-non-tensor-entry", _bin_with_metadata, 1, "entry 'epoch' is not a tensor"),
    Case("output-parent-is-a-file", lambda ws: _args(ws, write_cfg(ws), _file_at(ws, "afile") / "sub/out"), 1,
         "is a file, not a directory", output="afile/sub/out"),
    Case("output-dangling-symlink", lambda ws: _args(ws, write_cfg(ws), _symlink(ws, "dangling", ws / "nowhere")),
         1, "symbolic link", output="nowhere"),
    Case("output-exists", _user_dir, 1, "already exists", output="existing"),
    # 16. clearer checkpoint / adapter messages
    Case("adapter-config-invalid", _bad_adapter_config, 1, "adapter_config.json"),
    Case("adapter-missing-lora-B", _adapter_without_lora_b, 1, "lora_B", check=lambda ws, t: (
        re.search(r"module '.*query' has '.*lora_A.*' but no '.*lora_B.*' in adapter_model\.safetensors", t)
        or pytest.fail(t))),
    Case("layernorm-shape", lambda ws: _edited_ft(ws, "embeddings.LayerNorm.weight", torch.ones(17)), 1,
         "different sizes", not_in="vocabulary"),
    Case("embedding-shape", lambda ws: _edited_ft(ws, "embeddings.word_embeddings.weight", torch.zeros(41, 16)), 1,
         "vocabulary size differs"),
    # 11. single-file pretrained: said so, or config taken from `config:`
    Case("single-file-pretrained", _single_file_pretrained, 0, "no config.json", check=_check_no_config),
    Case("single-file-pretrained-config-key", _single_file_with_config_key, 0, "merged", check=_check_loads),
    # 3. --overwrite onto a file / a symlink leaves no .old; the link's target is not touched
    Case("overwrite-a-file", lambda ws: _args(ws, write_cfg(ws), _file_at(ws, "out"), "--overwrite"), 0, "merged"),
    Case("overwrite-a-symlink", _link_to_elsewhere, 0, "merged", output="linked", check=_check_overwrote_link),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_merge_input(case, ws, capsys):
    argv = case.setup(ws)
    out = ws / case.output
    existed = os.path.lexists(out)
    before = snapshot(ws, skip=None if case.code else out)
    code = main(["merge", *argv])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == case.code, text
    assert "Traceback" not in text
    if case.code:
        lines = error_lines(captured.err)
        assert len(lines) == 1, captured.err
        assert case.fragment in lines[0], lines[0]
        if case.not_in:
            assert case.not_in not in lines[0], lines[0]
        assert os.path.lexists(out) == existed, "a failed merge must not create its output"
    else:
        assert case.fragment in captured.out, text
        assert not error_lines(captured.err)
        assert out.is_dir()
    if case.check:
        case.check(ws, text)
    # inputs unchanged (after a success: everything but the output)
    assert snapshot(ws, skip=None if case.code else out) == (
        before if case.code else {k: v for k, v in before.items() if not k.startswith(case.output)})
    assert leftover_entries(ws) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_directory(ws, capsys):
    (ws / "ro").mkdir()
    os.chmod(ws / "ro", 0o555)
    try:
        before = snapshot(ws)
        assert main(["merge", *_args(ws, write_cfg(ws), "ro/out")]) == 1
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "not writable" in lines[0] and "ro" in lines[0]
        assert snapshot(ws) == before and leftover_entries(ws) == []
    finally:
        os.chmod(ws / "ro", 0o755)


# ----------------------------------------------------------------------------------------------
# 17. permissions follow the umask


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_output_permissions_follow_umask(ws, capsys, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        assert main(["merge", *_args(ws, write_cfg(ws))]) == 0
    finally:
        os.umask(old)
    out = ws / "out"
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    for name in ("merge_report.json", "merge_config.yaml", "README.md", "model.safetensors.index.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == file_mode, name


# ----------------------------------------------------------------------------------------------
# 2. concurrency: nothing is ever replaced without --overwrite; --overwrite runs take turns


SLOW_MERGE = """
import sys, time
from saft_hf.merging import io
_write = io.ShardedSafetensorsSink.write
def slow(self, *a, **k):
    time.sleep({delay})
    return _write(self, *a, **k)
io.ShardedSafetensorsSink.write = slow
from saft_hf.cli import main
sys.exit(main(["merge"] + sys.argv[1:]))
"""


def _spawn(argv, delay=0.05, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", SLOW_MERGE.format(delay=delay), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_two_merges_to_one_output_exactly_one_wins(ws):
    cfg = write_cfg(ws)
    (ws / "user.txt").write_text("the user's file\n")
    before = snapshot(ws)
    procs = [_spawn(_args(ws, cfg)) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    loser_err = next(r[2] for r in results if r[0] == 1)
    lines = error_lines(loser_err)
    assert len(lines) == 1 and ("is writing" in lines[0] or "already exists" in lines[0]), loser_err
    BertModel.from_pretrained(ws / "out")  # the winner's output is complete
    assert snapshot(ws, skip=ws / "out") == before
    assert leftover_entries(ws) == []


def test_overwrite_runs_take_turns(ws, monkeypatch):
    from saft_hf.merging import merge_models

    cfg = yaml.safe_load(write_cfg(ws).read_text())
    intervals, lock = [], threading.Lock()
    init, close, write = ShardedSafetensorsSink.__init__, ShardedSafetensorsSink.close, ShardedSafetensorsSink.write

    def timed_init(self, *a, **k):
        self._started = time.monotonic()
        init(self, *a, **k)

    def timed_close(self):
        result = close(self)
        with lock:
            intervals.append((self._started, time.monotonic()))
        return result

    def slow_write(self, *a, **k):
        time.sleep(0.01)
        return write(self, *a, **k)

    monkeypatch.setattr(ShardedSafetensorsSink, "__init__", timed_init)
    monkeypatch.setattr(ShardedSafetensorsSink, "close", timed_close)
    monkeypatch.setattr(ShardedSafetensorsSink, "write", slow_write)
    errors = []

    def run():
        try:
            merge_models(cfg, ws / "out", overwrite=True, progress=False)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    intervals.sort()
    assert len(intervals) == 3
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(intervals, intervals[1:])), intervals
    BertModel.from_pretrained(ws / "out")
    assert leftover_entries(ws) == []


@pytest.mark.parametrize("user_file", [None, "notes.txt"], ids=["empty-dir", "dir-with-file"])
def test_directory_created_during_merge_is_not_replaced(ws, capsys, monkeypatch, user_file):
    close = ShardedSafetensorsSink.close

    def user_creates_output(self):
        (ws / "out").mkdir()
        if user_file:
            (ws / "out" / user_file).write_text("created by the user meanwhile\n")
        return close(self)

    monkeypatch.setattr(ShardedSafetensorsSink, "close", user_creates_output)
    assert main(["merge", *_args(ws, write_cfg(ws))]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "was created by someone else" in lines[0] and "left untouched" in lines[0]
    entries = sorted(p.name for p in (ws / "out").iterdir())
    assert entries == ([user_file] if user_file else [])
    if user_file:
        assert (ws / "out" / user_file).read_text() == "created by the user meanwhile\n"
    assert leftover_entries(ws) == []


# ----------------------------------------------------------------------------------------------
# 3. a merge killed with SIGKILL: the next run removes its leftovers


def test_killed_merge_leftovers_are_cleaned_by_next_run(ws, caplog):
    cfg = write_cfg(ws)
    out = ws / "out"
    proc = _spawn(_args(ws, cfg), delay=0.3)
    deadline = time.monotonic() + 120
    try:
        while not any(p.is_dir() and any(p.iterdir()) for p in leftovers(out)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the merge never created its temporary directory"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    stale = leftovers(out)
    assert stale and not out.exists()
    with caplog.at_level("WARNING", logger="saft_hf.io_utils"):
        assert main(["merge", *_args(ws, cfg)]) == 0
    for p in stale:
        assert f"removed {p}" in caplog.text
    assert leftover_entries(ws) == []
    BertModel.from_pretrained(out)


# ----------------------------------------------------------------------------------------------
# 16. too many shards for the open-file limit: said so, not "corrupt"


def test_too_many_open_files_is_not_called_corrupt(tmp_path):
    import resource

    pre, ft = tmp_path / "pre", tmp_path / "ft.safetensors"
    pre.mkdir()
    weight_map, full = {}, {}
    for i in range(210):
        name = f"model-{i + 1:05d}-of-00210.safetensors"
        t = torch.full((2,), float(i))
        save_file({f"w{i}": t}, str(pre / name))
        weight_map[f"w{i}"] = name
        full[f"w{i}"] = t + 1
    (pre / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file(full, str(ft))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"pretrained": str(pre), "models": [str(ft)], "method": "task_arithmetic"}))
    before = snapshot(tmp_path)

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    proc = _spawn([str(cfg), "--output", str(tmp_path / "out"), "--no-progress"], delay=0, preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "too many open files" in lines[0] and "ulimit -n" in lines[0] and "corrupt" not in lines[0]
    assert snapshot(tmp_path) == before and leftover_entries(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# read-only and full filesystem (a small tmpfs; needs root)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a fresh 1 MB tmpfs; `mount(options)` returns its path. Unmounted in teardown."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(options="size=1m"):
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], check=False)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_read_only_and_full_filesystem(ws, tmpfs, capsys):
    cfg = write_cfg(ws)
    inputs = snapshot(ws)
    # read-only filesystem: refused before any work, nothing created
    ro = tmpfs("size=1m,ro")
    for out in (ro / "merged", ro / "deeper" / "merged"):
        assert main(["merge", *_args(ws, cfg, out)]) == 1
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "read-only filesystem" in lines[0] and str(ro) in lines[0], lines
        assert os.listdir(ro) == []
    # full filesystem: the merge fails while writing, one line, the space is given back
    full = tmpfs("size=1m")
    filler = full / "user-data.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\1" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - 8192)  # a few pages free: enough to start, too few for the model
    free_before = shutil.disk_usage(full).free
    filler_hash = hashlib.sha256(filler.read_bytes()).hexdigest()
    assert main(["merge", *_args(ws, cfg, full / "merged")]) == 1
    gc.collect()
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and "no space left on device" in lines[0] and "free some space" in lines[0], err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert os.listdir(full) == ["user-data.bin"]
    assert hashlib.sha256(filler.read_bytes()).hexdigest() == filler_hash
    assert shutil.disk_usage(full).free == free_before
    assert snapshot(ws) == inputs and leftover_entries(ws) == []
