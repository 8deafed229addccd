"""Tiny random LLaMA models and a character tokenizer for tests, built in-process (no downloads)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character; offsets map 1:1 to characters."""
    specials = ["[UNK]", "[PAD]", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")


# The presets never thin prompts below 512 tokens and always keep their first 128; test prompts
# are shorter, so tests that exercise propagation turn both off and follow the schedule alone.
SHORT_PROMPT_PROPAGATION = {"propagator.min_keep_tokens": 0, "propagator.keep_first_tokens": 0}


def tiny_config(**overrides) -> LlamaConfig:
    params = dict(
        vocab_size=98,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=2,
        pad_token_id=1,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def save_bpe_llama(
    out, corpus: list[str], *, vocab_size: int, num_hidden_layers: int, max_position_embeddings: int
) -> None:
    """Save a random LLaMA (GQA 4/2 heads, head_dim 32) and a byte-level BPE tokenizer trained on
    ``corpus`` into the folder ``out``: real-text prompts tokenise as they would for a real model."""
    import torch
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=0,
        eos_token_id=1,
    )
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(config).save_pretrained(out)
