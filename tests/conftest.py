"""Shared pytest set-up: offline Hugging Face, quiet logs, a free-port helper for launches."""

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port free at the time of the call (for torchrun --master_port)."""
    return find_free_port()


@pytest.fixture
def single_thread_torch():
    """Run a test with one torch intra-op thread (restored afterwards).

    On a small shared CPU, torch's default thread pool oversubscribes the cores and tiny models get
    ~10x slower; one thread is also the most reproducible. Opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread_torch")`.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
