"""The whole compressed prefill and decode on a CUDA device (skipped where there is none).

On a GPU the quantizer's ``auto`` backend is the Triton kernels; these tests check that the
end-to-end path (scoring, packing, propagation, decode over packed tiers) gives the same bytes
as the torch reference on the same device, and the same answers as the CPU.
"""

from __future__ import annotations

import pytest
import torch

from kvcore.config import CompressionConfig
from kvcore.model import CompressedLlamaForCausalLM

from tiny_models import SHORT_PROMPT_PROPAGATION, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAST = {"propagator.keep_ratio_by_layer": {1: 0.6, 2: 0.4}, **SHORT_PROMPT_PROPAGATION}


def _model(device: str, dtype: torch.dtype) -> CompressedLlamaForCausalLM:
    torch.manual_seed(0)
    model = CompressedLlamaForCausalLM(tiny_config()).eval()
    return model.to(device=device, dtype=dtype)


def _run(model: CompressedLlamaForCausalLM, config: CompressionConfig, ids: torch.Tensor, steps: int = 6):
    """Prefill ``ids`` then ``steps`` greedy decode steps; returns (cache, logits of every step)."""
    model.set_compression(config)
    out = model(input_ids=ids, cache=model.new_cache(), use_cache=True)
    logits, cache = [out.logits[:, -1].float()], out.cache
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for step in range(steps):
        pos = torch.tensor([[ids.shape[1] + step]], device=ids.device)
        out = model(input_ids=token, cache=cache, position_ids=pos, use_cache=True)
        logits.append(out.logits[:, -1].float())
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return cache, torch.cat(logits)


def _ids(n: int, device: str) -> torch.Tensor:
    return torch.randint(3, 98, (1, n), generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("preset", ["default", "fast"])
@torch.no_grad()
def test_triton_and_torch_backends_store_the_same_bytes(preset: str, dtype: torch.dtype) -> None:
    model = _model("cuda", dtype)
    ids = _ids(700, "cuda")
    base = CompressionConfig.from_preset(preset).with_overrides(FAST if preset == "fast" else {})
    results = {
        backend: _run(model, base.with_overrides({"quantizer.backend": backend}), ids)
        for backend in ("triton", "torch")
    }
    (cache_t, logits_t), (cache_r, logits_r) = results["triton"], results["torch"]
    assert cache_t.kv_bytes == cache_r.kv_bytes
    for i in range(model.config.num_hidden_layers):
        tiers_t, tiers_r = cache_t.layer(i).compressed.tiers, cache_r.layer(i).compressed.tiers
        assert len(tiers_t) == len(tiers_r) > 0
        for a, b in zip(tiers_t, tiers_r):
            assert a.bits == b.bits and torch.equal(a.positions, b.positions)
            for qa, qb in ((a.keys, b.keys), (a.values, b.values)):
                assert torch.equal(qa.packed, qb.packed)
                assert torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero, qb.zero)
    # Same bytes, so the prefill's logits are equal; the decode steps attend through the Triton
    # kernel, equal to the torch path up to float32 summation order, then rounded to ``dtype``.
    assert torch.equal(logits_t[0], logits_r[0])
    assert _kl(logits_r, logits_t).max() < 1e-3


def _kl(ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """KL(ref || got) per row of logits ``[steps, vocab]``."""
    lp_r, lp_g = torch.log_softmax(ref.float().cpu(), -1), torch.log_softmax(got.float().cpu(), -1)
    return (lp_r.exp() * (lp_r - lp_g)).sum(-1)


@torch.no_grad()
def test_gpu_and_cpu_agree_in_float32() -> None:
    config = CompressionConfig.from_preset("default")
    cache_c, logits_c = _run(_model("cpu", torch.float32), config, _ids(700, "cpu"))
    cache_g, logits_g = _run(_model("cuda", torch.float32), config, _ids(700, "cuda"))
    assert cache_g.kv_bytes == cache_c.kv_bytes
    assert cache_g.tokens_kept_per_layer() == cache_c.tokens_kept_per_layer()
    kl = _kl(logits_c, logits_g)
    assert float(kl.max()) < 1e-3, kl
