"""``CompressionBenchmark``: many compression configs on one suite, side by side with the full cache.

One model is loaded once; every example of the suite (synthetic probes or LongBench tasks) is
run first uncompressed (``full``, always included, always first) and then under every config on
the *same* prompt. Each finished (config, example) becomes one JSON line in
``DIR/results.jsonl``, written whole, flushed and fsynced, so an interrupted run loses nothing
already written and a rerun with the same arguments resumes where it stopped.

Fidelity to the uncompressed model is measured by teacher forcing: the reference's own greedy
tokens are fed through each config's cache (:meth:`KVCompPipeline.continuation_logprobs`) and
``KL(P_full || P_config)`` is taken at each of the first ``kl_steps`` positions, by the
functions of :mod:`.scoring` that ``kvcomp tune`` scores its trials with. The first
position alone says little for quantisation: the prefill's own last-token logits come from
full-precision attention inside the prefill, so only later steps read the compressed cache.

Rows are keyed by ``(config name, suite, example id, config hash)``; the hash covers the
config's resolved contents (defaults filled in, description left out).

Peers (kvpress presses, transformers' ``QuantizedCache``) run in the same benchmark as extra
configs named ``peer:<label>``: one process of the peers' environment
(:class:`~kvcomp_eval.peers.runner.PeerGenerator`) gets the same prompt text and question span, and its
teacher-forced KL is taken against the same ``full`` reference log-probs as kvcomp's configs.

Why one module: :class:`CompressionBenchmark` is one object whose methods share the loaded
pipelines, the peers' process and the suite's evaluator; its files go through
:class:`~kvcomp_eval.runs.store.ResultsStore` and its report through :mod:`.report`, so what is
left here is the loop itself.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from kvcomp_eval.data.longbench import DATASET2MAXLEN, STOP_STRINGS, LongBenchDataLoader, LongBenchExample
from kvcomp_eval.data.probes import build_probe
from kvcomp_eval.evaluators.longbench import LongBenchEvaluator
from kvcomp_eval.evaluators.probes import ProbeEvaluator
from kvcomp_eval.metrics.fidelity import output_rouge_l
from kvcomp_eval.peers.methods import PRESS_METHODS, PeerMethod, PeersUnavailable, peers_available
from kvcomp_eval.peers.runner import PeerGenerator
from kvcomp_eval.runs.report import write_report
from kvcomp_eval.runs.scoring import compare, generate, run_against_reference, teacher_forced
from kvcomp_eval.runs.store import REFERENCE, ResultsStore, config_hash, machine_info, peer_hash, row_key
from kvcomp_eval.runs.suite import BenchExample, BenchSuite
from kvcore.config import CompressionConfig, ConfigError
from kvcore.loading import DEFAULT_MODEL
from kvcore.types import GenerationResult

DEFAULT_KL_STEPS = 8
"""Teacher-forced positions over which the KL to the reference is averaged."""


# -- the pipeline as the evaluators' generator ---------------------------------------------------
class _Generator:
    """Adapts a pipeline to :class:`~kvcomp_eval.evaluators.base.TextGenerator`, with a prompt-length cap."""

    def __init__(self, pipe: Any, max_prompt_tokens: int) -> None:
        self.pipe = pipe
        self.tokenizer = pipe.tokenizer
        self.max_prompt_tokens = max_prompt_tokens

    def generate(
        self,
        prompt: str,
        *,
        question_span: tuple[int, int] | None = None,
        max_new_tokens: int = 32,
        stop: Sequence[str] = (),
    ) -> GenerationResult:
        return self.pipe.generate(prompt, question_span=question_span, max_new_tokens=max_new_tokens, stop=stop)


# -- the benchmark --------------------------------------------------------------------------------
@dataclass
class BenchOutcome:
    """What a run did: rows written now, rows found from earlier runs, and the report files."""

    written: int
    skipped: int
    summary: Path
    plots: list[Path] = field(default_factory=list)


class CompressionBenchmark:
    """Runs ``configs`` on ``suite`` against the uncompressed model; resumable.

    Parameters
    ----------
    configs:
        Ordered ``{name: CompressionConfig}``. ``full`` (the uncompressed reference) is added
        first when missing; the name ``full`` must not be given to a compressing config.
    suite:
        A :class:`BenchSuite` or a suite string (``passkey``, ``longbench:qasper``).
    out_dir:
        Folder for ``results.jsonl``, ``run.json``, ``summary.md`` and the plots.
    model:
        Model preset, folder, ``.gguf`` file or hub id, loaded once.
    max_new_tokens:
        Cap on generated tokens (default: the probe's / LongBench task's own number).
    use_question_span:
        Give the scorer the question's span (else it uses the last W prompt tokens).
    kl_steps:
        Teacher-forced positions K of the KL to the reference (the first K reference tokens).
    command:
        The command line, for the report.
    notes / variants:
        Extra lines and ablation variant descriptions for the report.
    pipeline:
        An already loaded :class:`~kvcore.pipeline.KVCompPipeline` for ``model`` (weights not
        quantised); loaded here when ``None``.
    device:
        ``cpu`` or ``cuda``.
    peers:
        Peer methods run as extra configs named ``peer:<label>`` (``peer:tova r=0.5``) in the
        peers' environment (``make peers-venv``); ``peer_threads`` caps its torch threads,
        ``peer_python`` names its interpreter (default: ``.venv-peers``, or ``$KVCOMP_PEERS_PYTHON``).
    progress, warmup:
        Show a progress bar; run each config once before timing (first calls pay one-off costs).
    """

    def __init__(
        self,
        configs: Mapping[str, CompressionConfig],
        suite: BenchSuite | str,
        out_dir: str | os.PathLike[str],
        *,
        model: str = DEFAULT_MODEL,
        max_new_tokens: int | None = None,
        use_question_span: bool = True,
        kl_steps: int = DEFAULT_KL_STEPS,
        command: str | None = None,
        experiment: str = "bench",
        notes: Sequence[str] = (),
        variants: Mapping[str, Mapping[str, Any]] | None = None,
        pipeline: Any = None,
        device: str = "cpu",
        peers: Sequence[PeerMethod] = (),
        peer_threads: int | None = None,
        peer_python: str | os.PathLike[str] | None = None,
        progress: bool = True,
        warmup: bool = True,
    ) -> None:
        if not configs and not peers:
            raise ValueError("no configs to benchmark: give at least one --preset, --config or --peer")
        for name, cfg in configs.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"config names must be non-empty strings, got {name!r}")
            if not isinstance(cfg, CompressionConfig):
                raise TypeError(f"config {name!r} must be a CompressionConfig, got {type(cfg).__name__}")
            if name == REFERENCE and not cfg.is_uncompressed:
                raise ValueError(f"the name {REFERENCE!r} is reserved for the uncompressed reference; rename that config")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive int or None, got {max_new_tokens!r}")
        if isinstance(kl_steps, bool) or not isinstance(kl_steps, int) or kl_steps < 1:
            raise ValueError(f"kl_steps must be a positive int, got {kl_steps!r}")
        self.suite = BenchSuite.parse(suite) if isinstance(suite, str) else suite
        self.reference_added = REFERENCE not in configs
        full = configs.get(REFERENCE, CompressionConfig.from_preset(REFERENCE))
        self.configs: dict[str, CompressionConfig] = {REFERENCE: full}
        self.configs.update({n: c for n, c in configs.items() if n != REFERENCE})
        for name, cfg in self.configs.items():
            try:
                cfg.validate_components()
            except ValueError as exc:
                raise ConfigError(f"config {name!r}: {exc}") from exc
        self.peers: dict[str, PeerMethod] = {}
        for method in peers:
            name = f"peer:{method.label}"
            if name in self.configs:
                raise ValueError(f"config name {name!r} is taken by a peer; rename the config")
            if name in self.peers:
                raise ValueError(f"peer {method.label!r} is given twice")
            self.peers[name] = method
        if peers and device != "cpu":
            raise ValueError("peers run on the CPU only (their environment holds torch's CPU build); drop --peer or use --device cpu")
        self.peer_threads = peer_threads
        self.peer_python = peer_python
        self._peer_gen: PeerGenerator | None = None
        self.hashes = {name: config_hash(cfg) for name, cfg in self.configs.items()}
        self.hashes.update({name: peer_hash(m) for name, m in self.peers.items()})
        self.out_dir = Path(out_dir)
        self.store = ResultsStore(self.out_dir)
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.use_question_span = use_question_span
        self.kl_steps = kl_steps
        self.command = command
        self.experiment = experiment
        self.log_prefix = f"kvcomp {experiment}"
        """What the run's messages on stderr start with: the command the user typed."""
        self.notes = list(notes)
        self.variants = {k: dict(v) for k, v in (variants or {}).items()}
        self.device = device
        self.progress = progress
        self.warmup = warmup
        self._pipes: dict[str, Any] = {}
        if pipeline is not None:
            if pipeline.weights_applied != "none":
                raise ValueError("the given pipeline has quantised weights; the reference needs the original ones")
            self._pipes["none"] = pipeline
        self._evaluator: ProbeEvaluator | LongBenchEvaluator | None = None
        self._longbench_data: dict[str, list[LongBenchExample]] | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Model, suite and generation settings: a run folder holds one identity only."""
        generation: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "use_question_span": self.use_question_span,
            "kl_steps": self.kl_steps,
        }
        # Only suites with stop strings name them: older folders of other suites still resume,
        # and rows generated before stop strings existed are not mixed with new ones.
        stops = {t: list(STOP_STRINGS[t]) for t in self.suite.tasks if self.suite.kind == "longbench" and t in STOP_STRINGS}
        if stops:
            generation["stop"] = stops
        return {"model": self.model, "suite": self.suite.identity(), "generation": generation}

    def check(self) -> None:
        """Every refusal that needs no model: inputs, the run folder, every LongBench row."""
        self.suite.check_inputs()
        self.store.check(self.identity())
        if self.peers:
            presses = any(m.name in PRESS_METHODS for m in self.peers.values())
            ok, reason = peers_available(self.peer_python, require_kvpress=presses)
            if not ok:
                raise PeersUnavailable(reason)
        if self.suite.kind == "longbench" and self._longbench_data is None:
            s = self.suite
            # With a length floor the rows kept are only known once their prompts are built: read them all.
            limit = s.limit if s.min_prompt_tokens is None else None
            loader = LongBenchDataLoader(s.data_dir, limit=limit, offset=s.offset, longbench_e=s.longbench_e)
            try:
                self._longbench_data = {task: loader.load(task) for task in s.tasks}
            except RuntimeError as exc:  # the hub could not be read; the message says what to do instead
                raise FileNotFoundError(str(exc)) from exc
            past_the_end = [task for task, rows in self._longbench_data.items() if not rows]
            if past_the_end:
                raise ValueError(f"--offset {s.offset} is past the last row of {', '.join(past_the_end)}: no row is left")

    def pipeline(self, weights: str = "none") -> Any:
        """The pipeline whose model has ``weights`` applied (loaded on first use)."""
        if weights not in self._pipes:
            from kvcore.pipeline import KVCompPipeline

            print(f"{self.log_prefix}: loading {self.model} ...", file=sys.stderr, flush=True)
            pipe = KVCompPipeline.from_pretrained(self.model, REFERENCE, device=self.device)
            if weights != "none":
                pipe.set_config(CompressionConfig.from_preset(REFERENCE).with_overrides({"weights": weights}))
            self._pipes[weights] = pipe
        return self._pipes[weights]

    def _use(self, name: str) -> Any:
        cfg = self.configs[name]
        pipe = self.pipeline(cfg.weights)
        pipe.set_config(cfg)
        return pipe

    def _gen_budget(self, pipe: Any) -> int:
        # Room for the generated tokens (and the teacher-forced ones) inside the position limit.
        longest = max(DATASET2MAXLEN[t] for t in self.suite.tasks)
        if self.max_new_tokens is not None:
            longest = min(longest, self.max_new_tokens)
        limit = pipe.max_prompt_tokens - longest - self.kl_steps - 2
        cap = self.suite.max_prompt_tokens
        return min(limit, cap) if cap is not None else limit

    def evaluator(self) -> ProbeEvaluator | LongBenchEvaluator:
        """The suite's evaluator (prompts, scoring), bound to the reference pipeline."""
        if self._evaluator is None:
            pipe = self.pipeline("none")
            s = self.suite
            if s.kind == "probe":
                self._evaluator = ProbeEvaluator(
                    _Generator(pipe, pipe.max_prompt_tokens),
                    probe=s.tasks[0],
                    lengths=s.lengths,
                    depths=s.depths,
                    n_per_cell=self._n_per_cell(),
                    seed=s.seed,
                    use_question_span=self.use_question_span,
                    haystack_dir=s.haystack_dir,
                    max_new_tokens=self.max_new_tokens,
                    progress=False,
                )
            else:
                self._evaluator = LongBenchEvaluator(
                    _Generator(pipe, self._gen_budget(pipe)),
                    tasks=s.tasks,
                    data_dir=s.data_dir,
                    limit=s.limit,
                    offset=s.offset,
                    use_question_span=self.use_question_span,
                    longbench_e=s.longbench_e,
                    max_new_tokens=self.max_new_tokens,
                    progress=False,
                )
        return self._evaluator

    def _n_per_cell(self) -> int:
        s = self.suite
        if s.n_per_cell is not None:
            return s.n_per_cell
        if s.limit is None:
            return 1
        return max(1, math.ceil((s.offset + s.limit) / (len(s.lengths) * len(s.depths))))

    def examples(self) -> list[BenchExample]:
        """Every example of the suite, prompts built (all LongBench rows validated first)."""
        ev = self.evaluator()
        out: list[BenchExample] = []
        if isinstance(ev, ProbeEvaluator):
            c = ev.config
            # Index-major order: any prefix of the sweep (``--limit``) covers every cell evenly.
            probes = [
                build_probe(
                    c.probe, ev.generator.tokenizer, length, depth, index=index, seed=c.seed, filler=ev.filler,
                    use_chat_template=c.use_chat_template, n_needles=c.n_needles, n_values=c.n_values,
                    chain_length=c.chain_length, n_distractor_chains=c.n_distractor_chains,
                )
                for index in range(c.n_per_cell)
                for length in c.lengths
                for depth in c.depths
            ]
            stop = None if self.suite.limit is None else self.suite.offset + self.suite.limit
            for ex in probes[self.suite.offset : stop]:
                out.append(BenchExample.from_probe(ex, max_new_tokens=ev.max_new_tokens, use_question_span=c.use_question_span))
        else:
            if self._longbench_data is None:
                self.check()
            floor, kept = self.suite.min_prompt_tokens, dict.fromkeys(self.suite.tasks, 0)
            for prep in ev.iter_prepared(self._longbench_data):
                if floor is not None and (prep.prompt.prompt_tokens < floor or kept[prep.task] == self.suite.limit):
                    continue
                kept[prep.task] += 1
                out.append(BenchExample.from_longbench(prep, use_question_span=ev.config.use_question_span))
        if not out:
            s = self.suite
            filters = [f"--{flag} {value}" for flag, value in (("offset", s.offset or None), ("limit", s.limit),
                       ("min-prompt-tokens", s.min_prompt_tokens)) if value]
            raise ValueError(f"suite {s.label} has no examples left after {', '.join(filters) or 'its selection'}")
        return out

    # -- one example ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Every config name in run order: ``full``, the kvcomp configs, then the peers."""
        return [*self.configs, *self.peers]

    def _peer(self, name: str) -> PeerGenerator:
        """The peers' process, switched to peer ``name`` (started on first use)."""
        if self._peer_gen is None:
            print(f"{self.log_prefix}: starting the peers' runner ...", file=sys.stderr, flush=True)
            self._peer_gen = PeerGenerator(
                self.peers[name], model=self.model, python=self.peer_python, threads=self.peer_threads, with_logprobs=False
            )
        self._peer_gen.method = self.peers[name]
        return self._peer_gen

    def _generate(self, name: str, ex: BenchExample) -> GenerationResult:
        if name in self.peers:
            return self.evaluator().run_prepared(ex.source, generator=self._peer(name))  # type: ignore[arg-type]
        return generate(self._use(name), ex)

    def _generate_with_kl(
        self, name: str, ex: BenchExample, ref_ids: Sequence[int], ref_lp: Tensor | None
    ) -> tuple[GenerationResult, list[float]]:
        """The config's generation and KL(full || name) in nats at each of the ``ref_lp.shape[0]``
        teacher-forced positions (none without reference tokens)."""
        if name in self.peers and ref_lp is not None:
            # One job: the runner teacher-forces on the prefilled cache, restores it, then decodes.
            teacher = list(ref_ids[: max(ref_lp.shape[0] - 1, 1)])  # it wants at least one token
            row = self._peer(name).run(
                ex.prompt, question_span=ex.question_span, max_new_tokens=ex.max_new_tokens,
                teacher_tokens=teacher, reference_logprobs=ref_lp, stop=ex.stop,
            )
            if row.kl_steps is None:
                raise RuntimeError(f"the peers' runner returned no KL for {name} on {ex.example_id}")
            return row.to_generation_result(), [float(v) for v in row.kl_steps]
        return run_against_reference(self._use(name), ex, ref_ids, ref_lp)

    def _row(
        self,
        name: str,
        ex: BenchExample,
        result: GenerationResult,
        reference: Mapping[str, Any],
        kl: list[float] | None,
    ) -> dict[str, Any]:
        base = self.evaluator().score_row(ex.source, result)  # type: ignore[arg-type]
        ref_ids = list(reference["token_ids"])
        row: dict[str, Any] = {
            "config": name,
            "config_hash": self.hashes[name],
            "suite": self.suite.label,
            "task": ex.task,
            "example_id": ex.example_id,
        }
        row.update({k: v for k, v in base.items() if k not in ("probe",)})
        fidelity = compare(ref_ids, result, kl or [])
        row["prompt_tokens"] = result.prompt_tokens
        row["kv_fraction"] = fidelity.kv_fraction
        row["token_ids"] = list(result.token_ids)
        row["kl_mean"] = fidelity.kl_mean
        row["kl_first"] = fidelity.kl_first
        row["kl_per_step"] = fidelity.kl_per_step if kl is not None else [0.0] * min(self.kl_steps, len(ref_ids))
        row["exact_match"] = fidelity.exact_match
        row["prefix_agreement"] = fidelity.prefix_agreement
        # Identical outputs agree fully even when they hold no word ROUGE could count.
        same_text = result.text == reference["prediction"]
        row["rouge_l_ref"] = 1.0 if same_text else output_rouge_l(str(reference["prediction"]), result.text)
        row["finished_at"] = datetime.now().astimezone().isoformat(timespec="seconds")
        return row

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> BenchOutcome:
        """Run every missing (config, example), append the rows, then write the report."""

        self.check()
        results_path = self.store.results_path
        examples = self.examples()
        for name in self.configs:  # each config against the loaded model (layer counts, head dims)
            try:
                self._use(name)
            except ValueError as exc:
                raise ConfigError(f"config {name!r} does not fit model {self.model}: {exc}") from exc
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = self.store.rows(repair=True)
        by_key = {row_key(r): r for r in existing}
        self._write_run_file()
        if self.reference_added:
            print(
                f"{self.log_prefix}: '{REFERENCE}' (the uncompressed model) is run first on every prompt as the "
                "reference for fidelity and TTFT (added: it was not among the configs)",
                file=sys.stderr,
            )

        def key(name: str, ex: BenchExample) -> tuple[str, str, str, str]:
            return (name, self.suite.label, ex.example_id, self.hashes[name])

        todo = [(ex, [n for n in self.names if key(n, ex) not in by_key]) for ex in examples]
        todo = [(ex, names) for ex, names in todo if names]
        n_todo = sum(len(names) for _, names in todo)
        skipped = len(examples) * len(self.names) - n_todo
        if skipped:
            print(f"{self.log_prefix}: {skipped} rows already in {results_path}; running the {n_todo} missing", file=sys.stderr)
        written = 0
        try:
            with self.store.appender() as writer:
                if todo and self.warmup:
                    self._warm_up([n for n in self.names if any(n in names for _, names in todo)], todo[0][0])
                with tqdm(total=n_todo, desc=f"bench {self.suite.label}", unit="run", disable=not self.progress) as bar:
                    for ex, names in todo:
                        ref_key = key(REFERENCE, ex)
                        if ref_key not in by_key:
                            bar.set_postfix_str(f"{ex.example_id} {REFERENCE}", refresh=False)
                            result = self._generate(REFERENCE, ex)
                            ref_row = self._row(REFERENCE, ex, result, {"token_ids": result.token_ids, "prediction": result.text}, None)
                            writer.write(ref_row)
                            by_key[ref_key] = ref_row
                            written += 1
                            bar.update(1)
                        reference = by_key[ref_key]
                        others = [n for n in names if n != REFERENCE]
                        if not others:
                            continue
                        ref_ids = list(reference["token_ids"])
                        ref_lp = teacher_forced(self._use(REFERENCE), ex, ref_ids, self.kl_steps)
                        for name in others:
                            bar.set_postfix_str(f"{ex.example_id} {name}", refresh=False)
                            result, kl = self._generate_with_kl(name, ex, ref_ids, ref_lp)
                            row = self._row(name, ex, result, reference, kl)
                            writer.write(row)
                            by_key[key(name, ex)] = row
                            written += 1
                            bar.update(1)
        finally:
            if self._peer_gen is not None:
                if self._peer_gen.versions:
                    self.store.record_peer_versions(self._peer_gen.versions)
                self._peer_gen.close()
                self._peer_gen = None
        files = write_report(self.out_dir)
        return BenchOutcome(written=written, skipped=skipped, summary=files[0], plots=files[1:])

    def _warm_up(self, names: Sequence[str], ex: BenchExample) -> None:
        # The first forward of a model (and of each compressor set-up) pays one-off costs:
        # allocator growth, kernel selection. One short run each keeps them out of TTFT.
        for name in names:
            if name in self.peers:
                self._peer(name).generate(ex.prompt, question_span=ex.question_span, max_new_tokens=1)
                continue
            pipe = self._use(name)
            pipe.generate(ex.prompt, question_span=ex.question_span, max_new_tokens=1)

    def _write_run_file(self) -> None:
        configs: dict[str, dict[str, Any]] = {
            name: {"hash": self.hashes[name], "config": cfg.to_dict()} for name, cfg in self.configs.items()
        }
        for name, method in self.peers.items():
            configs[name] = {
                "hash": self.hashes[name],
                "config": {
                    "description": f"peer {method.label}: bench/peers/run_peer.py in the peers' environment",
                    **method.to_json(),
                },
            }
        self.store.record_run(
            experiment=self.experiment,
            identity=self.identity(),
            model=self.model,
            suite=self.suite.model_dump(mode="json"),
            # This run's order first (full, the configs as given, the peers); the store keeps older names after.
            configs={n: configs[n] for n in self.names},
            variants=self.variants,
            notes=self.notes,
            run={
                "command": self.command,
                "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
                "machine": machine_info(self.device),
                "configs": self.names,
                "reference_added": self.reference_added,
                "limit": self.suite.limit,
                "offset": self.suite.offset,
                "n_per_cell": self.suite.n_per_cell,
                "min_prompt_tokens": self.suite.min_prompt_tokens,
            },
        )
