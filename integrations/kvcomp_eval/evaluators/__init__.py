"""Evaluators: run a text generator over a data source and score every answer.

- :mod:`.base`: the :class:`~.base.TextGenerator` protocol and the shared generate-and-score loop;
- :mod:`.longbench`: :class:`~.longbench.LongBenchEvaluator`;
- :mod:`.probes`: :class:`~.probes.ProbeEvaluator`.

Imports :mod:`kvcomp_eval.data`, :mod:`kvcomp_eval.metrics` and :mod:`kvcore`.
"""
