"""Experiment wrapper (not part of kvcomp): propagation keeps spans of tokens, not single tokens.

Before selective propagation ranks the candidates, each candidate's score becomes the largest
score within XP_SPAN tokens around it (a max-pool over the candidates, plus 1e-3 of its own score
to break ties), so a kept token tends to keep its neighbours: SmolLM2's layers after ~11 attend
mostly locally (docs/data/fast_local/locality_512.txt).
Usage: XP_SPAN=31 python span_xp.py bench ...   (the same arguments as `kvcomp bench`)
"""
import os
import sys

import torch

from kvcomp_plugins.propagators import selective as sel
from kvcomp_plugins.scorers import _common

SPAN = int(os.environ.get("XP_SPAN", "31"))
_select = sel.SelectivePropagator.select


def select(self, layer_idx, scores, positions, protected, n_original):
    if scores is not None and self.acts_after(layer_idx) and SPAN > 1:
        cand = (positions >= 0) & ~protected.bool()
        own = torch.where(cand[:, None, :], scores.float().clamp(0.0, 1.0), torch.zeros_like(scores, dtype=torch.float32))
        pooled = _common.pool_tokens(own.contiguous(), cand, SPAN, "max") + 1e-3 * own
        scores = torch.where(cand[:, None, :], pooled, scores.float())
    return _select(self, layer_idx, scores, positions, protected, n_original)


sel.SelectivePropagator.select = select
from kvcore.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
