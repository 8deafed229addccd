"""Inputs of an evaluation: LongBench data and prompts, synthetic probes, tokenisation.

- :mod:`.longbench`: task lists, the official prompts and lengths (the JSON files beside this
  module, see ``NOTICE``), the data loader and prompt building;
- :mod:`.probes`: synthetic long-context probes (passkey, multi-needle, ...);
- :mod:`.tokenization`: token counts, character-to-token spans and the padded-batch collator.

Imports only :mod:`kvcomp_eval.metrics` (task names) and :mod:`kvcore`.
"""
