"""Hyperparameter search with Optuna (``kvcomp tune``).

- :mod:`.settings`: :class:`~.settings.TuneSettings` and the tuning constants;
- :mod:`.space`: the search space and trial configs;
- :mod:`.objective`: tuning prompts, uncompressed references and the fidelity objective;
- :mod:`.study`: samplers, storage, model identity and the recorded data split;
- :mod:`.outputs`: ``trials.csv``, ``pareto.md``, ``best.yaml``;
- :mod:`.run`: :func:`~.run.run_tuning`; :mod:`.commands`: the CLI command.

Imports :mod:`kvcomp_eval.data`, :mod:`kvcomp_eval.runs.suite` and :mod:`kvcomp_eval.runs.scoring`
(a trial is scored by the benchmark's own code) and :mod:`kvcore`.
"""
