"""Experiment wrapper (not part of kvcomp): selective propagation ranks tokens by their scores
averaged over the layers since the last thinning (at most XP_ACC layers, the acting one
included) instead of the acting layer's scores alone. Same token set in those layers, so the
scores line up; every layer's scores are finalised per head as the scorer returns them.
XP_ACC_MODE=max takes the maximum over those layers instead of the mean."""
import os, sys
import torch
from kvcore import compressor as comp
from kvcomp_plugins.propagators import selective as sel

ACC = int(os.environ.get("XP_ACC", "0"))
MODE = os.environ.get("XP_ACC_MODE", "mean")
HISTORY: list[torch.Tensor] = []

_compress = comp.RealTimePrefillCompressor.compress_layer_kv_cache
def compress(self, obs):
    if obs.layer_idx == 0:
        HISTORY.clear()
    result = _compress(self, obs)
    if result.keep_idx is not None:
        HISTORY.clear()  # the token set changes: older scores no longer line up
    elif result.scores is not None:
        HISTORY.append(result.scores)
        del HISTORY[:-max(ACC - 1, 0)]
    return result
comp.RealTimePrefillCompressor.compress_layer_kv_cache = compress

_select = sel.SelectivePropagator.select
def select(self, layer_idx, scores, positions, protected, n_original):
    if ACC > 1 and scores is not None and self.acts_after(layer_idx):
        stack = torch.stack([*[h for h in HISTORY if h.shape == scores.shape], scores])
        scores = stack.amax(0) if MODE == "max" else stack.mean(0)
    return _select(self, layer_idx, scores, positions, protected, n_original)
sel.SelectivePropagator.select = select
from kvcore.cli import main
sys.exit(main(sys.argv[1:]))
