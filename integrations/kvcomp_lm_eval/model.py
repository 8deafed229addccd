"""``KVCompLM``: the lm-evaluation-harness model ``kvcomp-llama``.

    lm_eval --model kvcomp-llama \\
        --model_args pretrained=smollm2-135m,preset=default,scorer.alpha=0.5 \\
        --tasks longbench_multi_news

Generation runs :class:`~kvcore.pipeline.KVCompPipeline`: the prompt is prefilled with the KV cache
compressed layer by layer, then decoding reads the compressed cache. Log-likelihoods prefill the
*context* the same way and score the continuation through that compressed cache, so a
multiple-choice task measures the compressed model too (``loglikelihood=full`` scores on the
ordinary uncompressed forward instead). Generation runs ``batch_size`` requests at a time (each
prompt prefilled alone with its own question span, the decode steps batched); log-likelihoods run
one at a time. Cache cost (KV bytes against an fp16
cache of the same tokens) is summed per request type and logged at the end of each call.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from torch import Tensor
from tqdm import tqdm

from kvcore.cache import CompressedKVCache
from kvcore.config import CompressionConfig
from kvcore.pipeline import KVCompPipeline
from kvcore.text import encode_prompt, truncate_middle_text
from kvcomp_lm_eval.args import KVCompLMArgs, parse_model_args
from kvcomp_lm_eval.autoregister import MODEL_NAME, register_with_lm_eval

# A child of lm-eval's logger: the `lm_eval` CLI shows it with its own messages, at its verbosity.
logger = logging.getLogger("lm_eval.kvcomp_llama")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_GEN_KWARGS_USED = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}
QUESTION_FIELDS = ("question", "input")
"""Document fields holding the question: lm-eval's LongBench tasks use ``question``, LongBench's JSONL ``input``."""


@dataclass
class CacheCost:
    """Running totals of what the KV cache cost over the requests of one kind."""

    requests: int = 0
    kv_bytes: int = 0
    kv_bytes_fp16_full: int = 0
    ttft_s: float = 0.0

    def add(self, kv_bytes: int, kv_bytes_fp16_full: int, ttft_s: float = 0.0) -> None:
        self.requests += 1
        self.kv_bytes += kv_bytes
        self.kv_bytes_fp16_full += kv_bytes_fp16_full
        self.ttft_s += ttft_s

    @property
    def compression_ratio(self) -> float:
        """fp16 full-cache bytes over stored bytes, summed over the requests (higher is smaller)."""
        return self.kv_bytes_fp16_full / max(self.kv_bytes, 1)

    def summary(self, kind: str) -> str:
        n = max(self.requests, 1)
        text = (
            f"{MODEL_NAME} {kind}: {self.requests} requests, mean KV {self.kv_bytes / n / 2**20:.3f} MiB vs fp16 "
            f"{self.kv_bytes_fp16_full / n / 2**20:.3f} MiB (compression ratio {self.compression_ratio:.2f}x)"
        )
        return text + (f", mean TTFT {self.ttft_s / n:.3f} s" if self.ttft_s else "")


class KVCompLM(LM):
    """lm-eval model running a LLaMA checkpoint with kvcomp's compressed KV cache.

    Keyword arguments are lm-eval's ``--model_args`` (see :class:`~kvcomp_lm_eval.args.KVCompLMArgs`
    and :func:`~kvcomp_lm_eval.args.parse_model_args`): ``pretrained``, ``preset`` or ``config``,
    ``scorer``/``quantizer``/``propagator`` names, dotted component parameters such as
    ``scorer.alpha``, ``max_length``, ``max_gen_toks``, ``truncate``, ``loglikelihood``,
    ``question_from_doc``, ``dtype``, ``device``, ``seed``. Everything is validated before the
    weights load.

    Args:
        pipeline: an already-built pipeline (Python API); ``pretrained``/``dtype``/``device`` are
            then ignored.
    """

    def __init__(self, pipeline: KVCompPipeline | None = None, **model_args: Any) -> None:
        super().__init__()
        self.args: KVCompLMArgs
        self.args, config = parse_model_args(model_args)
        self.accelerator: Any = None
        device = self._setup_processes(self.args.device)
        if pipeline is None:
            pipeline = KVCompPipeline.from_pretrained(
                self.args.pretrained, config, dtype=_DTYPES[self.args.dtype], device=device
            )
        else:
            pipeline.set_config(config)
        self.pipeline = pipeline
        self._device = next(pipeline.model.parameters()).device
        limit = pipeline.max_prompt_tokens
        if self.args.max_length is not None and self.args.max_length > limit:
            raise ValueError(f"{MODEL_NAME}: max_length={self.args.max_length} exceeds the model's {limit} positions")
        self.max_length = self.args.max_length or limit
        self.cost: dict[str, CacheCost] = {}
        self._warned_kwargs: set[str] = set()

    # -- lm-eval plumbing ---------------------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "KVCompLM":
        """``--model_args a=1,b=2``; a key given there wins over lm-eval's own (``--device``...)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "KVCompLM":
        """Like lm-eval's, but ``device=cpu`` in ``model_args`` and ``--device cuda:0`` may both be given."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    def _setup_processes(self, device: str | None) -> str:
        """Pick the device; under ``accelerate launch`` (WORLD_SIZE > 1) join the process group."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            # Without cpu=True accelerate does not join a CPU process group (MULTI_CPU over gloo):
            # every process would run as rank 0 of 1 and answer every request.
            on_cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
            self.accelerator = Accelerator(cpu=on_cpu)
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
            return str(self.accelerator.device)
        if device is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        try:
            kind = torch.device(device).type
        except RuntimeError as exc:
            raise ValueError(f"{MODEL_NAME}: device {device!r} is not a torch device (cpu, cuda, cuda:1, mps...)") from exc
        if kind == "cuda" and not torch.cuda.is_available():
            # lm-eval passes --device (default cuda:0) even on machines without a GPU.
            logger.warning("%s: device %s is not available; running on cpu", MODEL_NAME, device)
            return "cpu"
        return device

    @property
    def config(self) -> CompressionConfig:
        """The compression config in use."""
        return self.pipeline.config

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.tokenizer

    @property
    def model(self) -> Any:
        return self.pipeline.model

    @property
    def prefix_token_id(self) -> int:
        """Token the first scored token of a rolling log-likelihood is conditioned on."""
        tok = self.tokenizer
        return int(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return chat_template if isinstance(chat_template, str) else self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def all_gather(self, tensor: Tensor) -> Tensor:
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.accelerator is None:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def _progress(self, requests: list[Instance], desc: str, disable: bool) -> Any:
        """A bar over ``requests``: iterate it, or call ``update`` on it."""
        return tqdm(requests, total=len(requests), desc=f"{MODEL_NAME} {desc}", disable=disable or self.rank != 0)

    def _log_cost(self, kind: str) -> None:
        cost = self.cost.get(kind)
        if cost is not None and cost.requests:
            logger.info(cost.summary(kind))

    # -- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) generation until a stop string or ``max_gen_toks``.

        Greedy requests with the same generation kwargs run ``batch_size`` at a time, longest
        prompts first (:meth:`~kvcore.pipeline.KVCompPipeline.generate_batch`: each row keeps its
        own question span, stops on its own and gives the text it gives alone). Sampled requests run one at a time, request ``i`` seeded
        with ``seed + i``, so their draws do not depend on the batch size.
        """
        jobs = [self._generation_job(i, request) for i, request in enumerate(requests)]
        outputs: list[str] = [""] * len(jobs)
        cost = self.cost.setdefault("generate_until", CacheCost())
        progress = self._progress(requests, "generate_until", disable_tqdm)
        for batch in _batches(jobs, self.args.batch_size):
            first = batch[0]
            results = self.pipeline.generate_batch(
                [job.prompt for job in batch],
                question_spans=[job.span for job in batch],
                seed=first.seed,
                truncate=self.args.truncate,
                stop=list(first.until),
                **first.options,
            )
            for job, result in zip(batch, results):
                # Decoding ends at the first stop string (not after max_gen_toks); the cut is then a
                # no-op kept for texts whose stop string only appears once EOS tokens are dropped.
                text = cut_at_stop(result.text, list(job.until))
                cost.add(result.kv_bytes, result.kv_bytes_fp16_full, result.ttft_s)
                self.cache_hook.add_partial("generate_until", requests[job.index].args, text)
                outputs[job.index] = text
            progress.update(len(batch))
        progress.close()
        self._log_cost("generate_until")
        return outputs

    def _generation_job(self, index: int, request: Instance) -> "_GenerationJob":
        context, gen_kwargs = request.args
        until, options = self._generation_options(gen_kwargs)
        prompt = self._fit_prompt(context, options["max_new_tokens"])
        return _GenerationJob(
            index=index,
            prompt=prompt,
            span=self._question_span(getattr(request, "doc", None), prompt),
            until=tuple(until),
            options=options,
            seed=self.args.seed + index if options["do_sample"] else None,
        )

    def _generation_options(self, gen_kwargs: Any) -> tuple[list[str], dict[str, Any]]:
        """``until`` stop strings and the :meth:`KVCompPipeline.generate` keywords of a request."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"{MODEL_NAME}: expected generation kwargs as a dict, got {type(gen_kwargs).__name__}")
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, list) or not all(isinstance(s, str) for s in until):
            raise ValueError(f"{MODEL_NAME}: 'until' must be a string or a list of strings, got {until!r}")
        max_new = int(gen_kwargs.get("max_gen_toks") or self.args.max_gen_toks)
        temperature = float(gen_kwargs.get("temperature", 1.0) or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        ignored = sorted(set(gen_kwargs) - _GEN_KWARGS_USED - self._warned_kwargs)
        if ignored:
            logger.warning("%s ignores generation kwargs %s", MODEL_NAME, ", ".join(ignored))
            self._warned_kwargs.update(ignored)
        options = {
            "max_new_tokens": max_new,
            "do_sample": do_sample,
            "temperature": temperature if do_sample else 1.0,
            "top_p": float(gen_kwargs.get("top_p", 1.0)) if do_sample else 1.0,
        }
        return [s for s in until if s], options

    def _fit_prompt(self, context: str, max_new_tokens: int) -> str:
        """Middle-truncate ``context`` to ``max_length - max_new_tokens`` tokens when ``max_length`` is
        below the model's limit (LongBench's rule: keep the first and last halves, decoded back to
        text). At the model's own limit the pipeline truncates on token ids itself."""
        budget = self.max_length - max_new_tokens
        if budget < 2:
            raise ValueError(
                f"{MODEL_NAME}: max_gen_toks={max_new_tokens} leaves no room for a prompt in max_length={self.max_length} "
                "tokens; lower max_gen_toks (--gen_kwargs max_gen_toks=N) or raise max_length"
            )
        if self.args.max_length is None or self.args.truncate != "middle":
            return context
        return truncate_middle_text(self.tokenizer, context, budget)[0]

    def _question_span(self, doc: Any, prompt: str) -> tuple[int, int] | None:
        """Character span of the document's question inside ``prompt`` (its last occurrence), if any."""
        if not self.args.question_from_doc or not isinstance(doc, dict):
            return None
        for field in QUESTION_FIELDS:
            question = doc.get(field)
            if isinstance(question, str) and question.strip():
                start = prompt.rfind(question)
                if start >= 0:
                    return start, start + len(question)
        return None

    # -- log-likelihood -----------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Log-probability of each ``(context, continuation)`` and whether greedy decoding produces it."""
        results = []
        for request in self._progress(requests, "loglikelihood", disable_tqdm):
            context, continuation = request.args
            ctx_ids, cont_ids = self._encode_pair(context, continuation)
            logprob, greedy = self._score_tokens(ctx_ids, cont_ids, "loglikelihood")
            self.cache_hook.add_partial("loglikelihood", request.args, (logprob, greedy))
            results.append((logprob, greedy))
        self._log_cost("loglikelihood")
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-probability of whole strings, in windows of ``max_length`` tokens (each token scored once)."""
        results = []
        for request in self._progress(requests, "loglikelihood_rolling", disable_tqdm):
            (text,) = request.args
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            windows = get_rolling_token_windows(
                token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            )
            total = 0.0
            for ctx_ids, cont_ids in map(make_disjoint_window, windows):
                total += self._score_tokens(ctx_ids, cont_ids, "loglikelihood_rolling")[0]
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            results.append(total)
        self._log_cost("loglikelihood_rolling")
        return results

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, split where ``context + continuation`` tokenises.

        Trailing spaces of the context move to the continuation (``"Answer: " + "yes"`` scores
        ``" yes"``); an empty context becomes the prefix token. An over-long pair keeps the end of
        the context (the continuation must fit in ``max_length - 1`` tokens).
        """
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        context = stripped
        if not continuation:
            raise ValueError(f"{MODEL_NAME}: loglikelihood request with an empty continuation")
        if context:
            ctx_ids = encode_prompt(self.tokenizer, context)
            whole = encode_prompt(self.tokenizer, context + continuation)
            cont_ids = whole[len(ctx_ids) :] if whole[: len(ctx_ids)] == ctx_ids else []
            if not cont_ids:  # the tokeniser merged across the boundary: encode the parts apart
                cont_ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        else:
            ctx_ids = [self.prefix_token_id]
            cont_ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if len(cont_ids) >= self.max_length:
            raise ValueError(
                f"{MODEL_NAME}: continuation of {len(cont_ids)} tokens does not fit max_length={self.max_length}"
            )
        keep = self.max_length + 1 - len(cont_ids)  # inputs are context + continuation[:-1]
        return ctx_ids[-keep:], cont_ids

    @torch.no_grad()
    def _score_tokens(self, ctx_ids: list[int], cont_ids: list[int], kind: str) -> tuple[float, bool]:
        """Sum of log-probabilities of ``cont_ids`` after ``ctx_ids`` and whether each is the argmax.

        Compressed: prefill the context (compressing its cache), take the next-token logits of its
        last token, then run ``cont_ids[:-1]`` through the compressed cache for the rest. A context
        of one token has nothing to compress and uses the uncompressed forward.
        """
        model, device = self.model, self.device
        ctx = torch.tensor([ctx_ids], dtype=torch.long, device=device)
        cont = torch.tensor(cont_ids, dtype=torch.long, device=device)
        compressed = self.args.loglikelihood == "compressed" and model.compressor is not None and len(ctx_ids) > 1
        if compressed:
            out = model(input_ids=ctx, cache=model.new_cache(), use_cache=True)
            cache = out.cache
            assert isinstance(cache, CompressedKVCache)
            stored, stored_fp16 = cache.kv_bytes, cache.kv_bytes_fp16_full()  # the context's cache alone
            logits = out.logits[0, -1:].float()
            if len(cont_ids) > 1:
                rest = model(input_ids=cont[None, :-1], cache=cache, use_cache=True).logits[0].float()
                logits = torch.cat([logits, rest])
            self.cost.setdefault(kind, CacheCost()).add(stored, stored_fp16)
        else:
            inputs = torch.cat([ctx[0], cont[:-1]])[None]
            logits = model(input_ids=inputs, use_cache=False).logits[0, len(ctx_ids) - 1 :].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        total = float(logprobs.gather(-1, cont[:, None]).sum())
        greedy = bool((logits.argmax(dim=-1) == cont).all())
        return total, greedy


@dataclass(frozen=True)
class _GenerationJob:
    """One ``generate_until`` request, ready for the pipeline."""

    index: int
    prompt: str
    span: tuple[int, int] | None
    until: tuple[str, ...]
    options: dict[str, Any]
    seed: int | None

    @property
    def group(self) -> tuple[Any, ...]:
        """Requests that may share a batch: same stop strings and generation options."""
        return (self.until, tuple(sorted(self.options.items())))


def _batches(jobs: list[_GenerationJob], batch_size: int) -> list[list[_GenerationJob]]:
    """Greedy jobs grouped by :attr:`_GenerationJob.group`, longest prompts first (rows of similar
    length share a batch: fewer filler slots), cut into batches of ``batch_size``; sampled jobs
    alone, in request order."""
    groups: dict[tuple[Any, ...], list[_GenerationJob]] = {}
    batches = []
    for job in jobs:
        if job.seed is not None:
            batches.append([job])
        else:
            groups.setdefault(job.group, []).append(job)
    for group in groups.values():
        group.sort(key=lambda job: len(job.prompt), reverse=True)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


def cut_at_stop(text: str, until: list[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        idx = text.find(stop)
        if 0 <= idx < cut:
            cut = idx
    return text[:cut]


register_with_lm_eval(KVCompLM)
