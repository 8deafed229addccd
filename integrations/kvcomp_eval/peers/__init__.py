"""Peers side by side with kvcomp: kvpress presses and transformers' ``QuantizedCache``.

They run in their own virtual environment through ``bench/peers/run_peer.py``:

- :mod:`.methods`: peer methods, jobs, and whether the peers' environment is there;
- :mod:`.protocol`: the runner's JSON rows, parsed and checked;
- :mod:`.runner`: :class:`~.runner.PeerRunner` (the subprocess) and
  :class:`~.runner.PeerGenerator` (a peer as a text generator).

Imports :mod:`kvcomp_eval.metrics` and :mod:`kvcore`.
"""
