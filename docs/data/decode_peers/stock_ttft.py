"""Stock transformers' prefill time in whichever environment runs it (not part of kvcomp): the
embedded model, sdpa, 4k random tokens, best of 3. Run it with both environments, alternately:

    P=$(.venv/bin/python -c "from kvcore.loading import resolve_model; print(resolve_model('smollm2-135m'))")
    for i in 1 2; do .venv/bin/python docs/data/decode_peers/stock_ttft.py $P 4000
                     .venv-peers/bin/python docs/data/decode_peers/stock_ttft.py $P 4000; done
"""
import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

path, n = sys.argv[1], int(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
ids = torch.randint(100, 20000, (1, n), generator=torch.Generator().manual_seed(0))
times = []
with torch.no_grad():
    for _ in range(3):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - start)
print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "best_s": min(times), "all_s": times}))
