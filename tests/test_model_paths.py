"""`saft_hf.model_paths`: which names are local paths, and the messages for missing ones (issue 11, 14)."""
from __future__ import annotations

import os

import pytest

from saft_hf.io_utils import os_error_message
from saft_hf.model_paths import ModelPathError, check_model_path, hub_load_errors, looks_local


@pytest.mark.parametrize("name, local", [
    ("bert-base-uncased", False), ("openai/clip-vit-base-patch32", False), ("org/name.v2", False),
    ("./model", True), ("../model", True), ("~/models/x", True), ("/abs/model", True), ("runs/a/b", True),
    ("a//b", True), ("name with space", True), ("org/na--me", True),
])
def test_looks_local(name, local):
    assert looks_local(name) is local


def test_partially_existing_name_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("runs/merged")
    (tmp_path / "runs").mkdir()
    assert looks_local("runs/merged")  # "runs" is here: the user meant a path
    with pytest.raises(ModelPathError, match=r"--model path runs/merged does not exist \(runs exists"):
        check_model_path("runs/merged", "--model")


def test_existing_paths_and_hub_names_pass(tmp_path):
    assert check_model_path(str(tmp_path)) == str(tmp_path)
    assert check_model_path("org/name") == "org/name"


def test_missing_path_message_is_one_line_via_os_error_message(tmp_path):
    with pytest.raises(ModelPathError) as err:
        check_model_path(tmp_path / "a" / "b", "checkpoint")
    message = os_error_message(err.value)
    assert message == str(err.value) and "checkpoint path" in message and "does not exist" in message
    assert "Repo id" not in message and "\n" not in message


def test_hub_errors_become_messages(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelPathError, match="neither a local path nor a cached Hub model, and HF_HUB_OFFLINE"):
        with hub_load_errors("org/not-cached"):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    with pytest.raises(OSError, match="disk"):  # unrelated errors pass through unchanged
        with hub_load_errors(os.getcwd()):
            raise OSError("disk on fire")
