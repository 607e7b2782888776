"""One rule for "is this model name a local path or a Hub name?", used by every model loader.

`transformers` treats any name that is not an existing directory as a Hub repo id, so a mistyped
local path is reported as "Repo id must be in the form 'repo_name'", and a Hub name that is not
cached, offline, as a connection problem with no hint. `check_model_path` says instead that the
path does not exist; `hub_load_errors` turns the Hub's offline error into one naming the model
and the fix. Both raise `FileNotFoundError` (an `OSError`), which the command line reports as one
`saft-hf <command>: error:` line (`saft_hf.io_utils.os_error_message`).
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

__all__ = ["looks_local", "check_model_path", "hub_load_errors", "ModelPathError"]

# A Hub repo id: `name` or `namespace/name` of letters, digits, '-', '_', '.' (huggingface_hub's rule).
_REPO_ID = re.compile(r"^[A-Za-z0-9_.-]{1,96}(/[A-Za-z0-9_.-]{1,96})?$")


class ModelPathError(FileNotFoundError):
    """A model name that names no local path and cannot be a (reachable) Hub model; one-line message."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.model_name = name


def looks_local(name: str | os.PathLike) -> bool:
    """True if `name` can only mean a local path: it is not a valid Hub repo id (absolute, `./`,
    `~`, more than one '/', ...), or its first component exists here (`runs/merged` with `runs/`)."""
    text = os.fspath(name)
    if text.startswith((".", "~")) or os.path.isabs(text) or (os.sep != "/" and os.sep in text):
        return True
    if not _REPO_ID.fullmatch(text) or "--" in text or ".." in text:
        return True
    head = text.split("/", 1)[0]
    return "/" in text and os.path.isdir(head)


def check_model_path(name: str | os.PathLike, what: str = "model", hub_kind: str = "model") -> str:
    """Return `name` (a str) if it exists locally or may be a Hub name; raise `ModelPathError`
    ("<what> path X does not exist") if it can only be a local path and is not there. `hub_kind`
    names what a Hub name would be in the hint ("model", "dataset")."""
    text = os.fspath(name)
    if os.path.exists(os.path.expanduser(text)) or not looks_local(text):
        return text
    existing = _deepest_existing(os.path.expanduser(text))
    hint = f" ({existing} exists, but not the rest)" if existing else ""
    raise ModelPathError(f"{what} path {text} does not exist{hint}; check the path (a Hub {hub_kind} is named "
                         "like org/name)", text)


def _deepest_existing(path: str) -> str | None:
    path = os.path.normpath(path)
    parent = os.path.dirname(path)
    while parent and parent != path:
        if os.path.exists(parent):
            return parent if parent not in (".", os.sep) else None
        path, parent = parent, os.path.dirname(parent)
    return None


@contextlib.contextmanager
def hub_load_errors(name: str | os.PathLike, what: str = "model") -> Iterator[None]:
    """Around a `from_pretrained(name)`: the Hub's "couldn't connect" / offline errors and its
    repo-id complaints become a `ModelPathError` naming `name` and the fix."""
    text = os.fspath(name)
    check_model_path(text, what)
    try:
        yield
    except ModelPathError:
        raise
    except OSError as exc:
        message = str(exc)
        if os.path.exists(os.path.expanduser(text)):
            raise
        if "Repo id must" in message:
            raise ModelPathError(f"{what} path {text} does not exist; check the path", text) from None
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if offline or "couldn't connect" in message or "offline" in message.lower():
            why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub is unreachable (offline?)"
            raise ModelPathError(f"{what} {text} is neither a local path nor a cached Hub model, and {why}; pass "
                                 "the local directory of the model, or download it first (online: "
                                 f"`huggingface-cli download {text}`)", text) from None
        if exc.errno is None and "does not appear to have" in message:
            raise ModelPathError(f"{what} {text}: {' '.join(message.split())}", text) from None
        raise

