"""Measures: LongBench answer metrics, fidelity to the uncompressed model, cost summaries, monitors.

- :mod:`.tasks`: the LongBench answer metrics (qa F1, ROUGE-L, classification, ...);
- :mod:`.fidelity`: KL, exact match and prefix agreement against the uncompressed model;
- :mod:`.summary`: :class:`~.summary.CompressionMetrics` over a set of generations;
- :mod:`.monitor`: peak memory and wall-clock timing.

Imports nothing of :mod:`kvcomp_eval` outside this package.
"""
