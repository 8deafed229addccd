"""Fixtures: tiny random LLaMA models (see tests/tiny_models.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import char_tokenizer, tiny_config
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from kvcore.model import CompressedLlamaForCausalLM


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()


@pytest.fixture(scope="session")
def model_pair() -> tuple[CompressedLlamaForCausalLM, LlamaForCausalLM]:
    """The same random weights as our model and as transformers' stock SDPA model."""
    torch.manual_seed(0)
    ours = CompressedLlamaForCausalLM(tiny_config()).eval()
    stock = LlamaForCausalLM(copy.deepcopy(ours.config)).eval()
    stock.load_state_dict(ours.state_dict())
    stock.set_attn_implementation("sdpa")
    return ours, stock
