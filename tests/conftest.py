"""Shared test set-up.

Triton only runs on CPU through its interpreter, which must be switched on before triton is
imported anywhere, so it is set here, at collection start, when no GPU is present.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaMA and its character tokenizer saved as a model folder (``--model DIR``)."""
    from tiny_models import char_tokenizer, tiny_config

    from kvcore.model import CompressedLlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    CompressedLlamaForCausalLM(tiny_config()).eval().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """Two shared cores: several torch threads on a tiny model mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
