"""One prompt encoder everywhere: no path ever puts two BOS tokens in front of a prompt.

A chat template writes the BOS token as text; the tokenizer adds another unless told not to.
The pipeline, the evaluation code (token counts, the collator) and the lm-eval model all encode
through :mod:`kvcore.text`, so a prompt holds one BOS whether or not its text starts with one.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from kvcomp_eval.data.tokenization import DataCollator, count_prompt_tokens
from kvcomp_lm_eval.model import KVCompLM
from kvcore.config import CompressionConfig
from kvcore.model import CompressedLlamaForCausalLM
from kvcore.pipeline import KVCompPipeline
from kvcore.text import encode_prompt, encode_prompt_with_offsets

BOS = "<s>"
TEXTS = ("Question: who won?", f"{BOS}[INST] Question: who won? [/INST]", f"{BOS}{BOS}twice already")


@pytest.fixture(scope="module")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, and a post-processor that puts BOS in front (as LLaMA's does)."""
    specials = ["[UNK]", "[PAD]", "</s>", BOS]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>", bos_token=BOS
    )


@pytest.fixture(scope="module")
def pipe(bos_tokenizer: PreTrainedTokenizerFast) -> KVCompPipeline:
    torch.manual_seed(0)
    model = CompressedLlamaForCausalLM(tiny_config(vocab_size=len(bos_tokenizer), bos_token_id=3)).eval()
    return KVCompPipeline(model, bos_tokenizer, CompressionConfig.from_preset("full"))


def _bos_count(tokenizer: PreTrainedTokenizerFast, ids: list[int], text: str) -> int:
    """BOS tokens the encoder added or doubled: all of them, less those the text itself repeats."""
    written = text.count(BOS)
    return ids.count(tokenizer.bos_token_id) - max(written - 1, 0)


@pytest.mark.parametrize("text", TEXTS)
def test_the_kernel_encoder_adds_bos_at_most_once(bos_tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = encode_prompt(bos_tokenizer, text)
    assert ids[0] == bos_tokenizer.bos_token_id
    assert _bos_count(bos_tokenizer, ids, text) == 1
    assert encode_prompt_with_offsets(bos_tokenizer, text)[0] == ids
    assert count_prompt_tokens(bos_tokenizer, text) == len(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_pipeline_collator_and_lm_eval_encode_alike(
    bos_tokenizer: PreTrainedTokenizerFast, pipe: KVCompPipeline, text: str
) -> None:
    expected = encode_prompt(bos_tokenizer, text)
    span = (text.index("who") if "who" in text else 0, len(text))
    ids, _ = pipe.encode(text, span)
    assert ids[0].tolist() == expected
    assert pipe.encode(text)[0][0].tolist() == expected

    batch = DataCollator(bos_tokenizer)([text], [span])
    assert batch.input_ids[0].tolist() == expected

    lm = KVCompLM(pipeline=pipe)
    ctx_ids, cont_ids = lm._encode_pair(text, " yes")
    assert ctx_ids == expected
    assert _bos_count(bos_tokenizer, ctx_ids + cont_ids, text) == 1
