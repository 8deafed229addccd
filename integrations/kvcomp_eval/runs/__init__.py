"""Benchmark runs: ``kvcomp bench``, ``run`` and ``ablate``, their files and their report.

- :mod:`.suite`: what a run covers (:class:`~.suite.BenchSuite`, its examples);
- :mod:`.store`: :class:`~.store.ResultsStore`, the only owner of ``results.jsonl`` and
  ``run.json`` (row format, append, repair, resume check, the run record);
- :mod:`.benchmark`: :class:`~.benchmark.CompressionBenchmark`, the run loop;
- :mod:`.scoring`: one example against the uncompressed reference (generation, teacher-forced
  log-probs, KL, agreement, KV fraction), shared with :mod:`kvcomp_eval.tune`;
- :mod:`.stats`, :mod:`.report`, :mod:`.plots`: means, ``summary.md``/``results.csv`` and the
  PNG plots, read from the store;
- :mod:`.experiments`: ablation variants; :mod:`.commands`: the CLI commands.

Imports :mod:`kvcomp_eval.data`, :mod:`.evaluators`, :mod:`.metrics`, :mod:`.peers` and :mod:`kvcore`.
"""
