"""Shared fixtures; the tiny store builders themselves are `vlmixer.storage.synthetic`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlmixer.storage.synthetic import TINY_WORDS  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():  # noqa: ANN201
    """Tests compute on small tensors on a 2-core machine shared by several processes (Ray actors,
    DataLoader workers, torchrun ranks): one intra-op thread each is faster than OpenMP threads
    spinning against each other, and keeps in-process results bitwise equal to 1-thread actors'."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_vocab_file(tmp_path: Path) -> Path:
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(TINY_WORDS) + "\n", encoding="utf-8")
    return p


