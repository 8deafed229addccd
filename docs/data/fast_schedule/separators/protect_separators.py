"""Experiment wrapper (not part of kvcomp): runs `kvcomp` with separator tokens protected in propagation.

SEP_MODE=sent: newline tokens and sentence ends (. ! ?); SEP_MODE=all: also , ; :. Usage:
    SEP_MODE=sent python protect_separators.py bench --preset full --config sep_sent_s4.yaml ...
"""
import os, re, sys
import torch
from kvcore.loading import load_tokenizer, resolve_model
from kvcomp_plugins.propagators import selective as sel

MODE = os.environ["SEP_MODE"]  # sent | all
tok = load_tokenizer(resolve_model("smollm2-135m"))
ids = []
for t, i in tok.get_vocab().items():
    s = tok.convert_tokens_to_string([t])
    if s.strip() == "" and "\n" in s: ids.append(i)
    elif MODE == "sent" and re.fullmatch(r"\s*[.!?]+\s*", s): ids.append(i)
    elif MODE == "all" and re.fullmatch(r"\s*[.!?;:,]+\s*", s): ids.append(i)
SEP = torch.tensor(sorted(ids))
STASH = {}
_emb = torch.nn.Embedding.forward
def emb_forward(self, input):
    if input.dim() == 2 and input.shape[1] > 1:
        STASH["ids"] = input.detach()
    return _emb(self, input)
torch.nn.Embedding.forward = emb_forward
_select = sel.SelectivePropagator.select
def select(self, layer_idx, scores, positions, protected, n_original):
    ids = STASH.get("ids")
    if ids is not None and ids.shape[1] == n_original and positions.shape[0] == ids.shape[0]:
        tokens = ids.gather(1, positions.clamp_min(0))
        protected = protected.bool() | (torch.isin(tokens, SEP) & (positions >= 0))
    return _select(self, layer_idx, scores, positions, protected, n_original)
sel.SelectivePropagator.select = select
from kvcore.cli import main
sys.exit(main(sys.argv[1:]))
