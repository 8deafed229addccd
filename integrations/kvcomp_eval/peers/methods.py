"""Peer methods and jobs: what the peers' runner is asked to run, and whether it can."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PEER_METHODS: tuple[str, ...] = (
    "full",
    "snapkv",
    "streaming_llm",
    "expected_attention",
    "knorm",
    "tova",
    "quantized_cache",
)
"""Methods the runner knows; ``full`` is the uncompressed model in the peers' environment."""

PEERS_PYTHON_ENV = "KVCOMP_PEERS_PYTHON"
"""Environment variable naming the peers environment's Python (default ``<repo>/.venv-peers/bin/python``)."""
PEERS_RUNNER_ENV = "KVCOMP_PEERS_RUNNER"
"""Environment variable naming the runner script (default ``<repo>/bench/peers/run_peer.py``)."""

_REPO_ROOT = Path(__file__).resolve().parents[3]


class PeersUnavailable(RuntimeError):
    """The peers' environment or runner script is missing (build it with ``make peers-venv``)."""


class PeerRunnerError(RuntimeError):
    """The runner failed or answered something that does not follow the protocol."""


class PeerJobError(ValueError):
    """The runner refused the job before any work (bad method, params, prompt or model)."""


def default_peers_python() -> Path:
    """``$KVCOMP_PEERS_PYTHON``, else the repository's ``.venv-peers/bin/python``."""
    env = os.environ.get(PEERS_PYTHON_ENV)
    return Path(env) if env else _REPO_ROOT / ".venv-peers" / "bin" / "python"


def default_runner_script() -> Path:
    """``$KVCOMP_PEERS_RUNNER``, else the repository's ``bench/peers/run_peer.py``."""
    env = os.environ.get(PEERS_RUNNER_ENV)
    return Path(env) if env else _REPO_ROOT / "bench" / "peers" / "run_peer.py"


def peers_available(python: str | os.PathLike[str] | None = None, require_kvpress: bool = True) -> tuple[bool, str]:
    """Whether the peers' environment can run, and why not: ``(ok, reason)``.

    Checks that the interpreter and runner exist and that transformers (and kvpress, unless
    ``require_kvpress`` is false: the ``full`` peer needs transformers alone) import in it.
    """
    py = Path(python) if python is not None else default_peers_python()
    script = default_runner_script()
    if not py.exists():
        return False, f"peers environment not built: {py} is missing (run `make peers-venv`)"
    if not script.is_file():
        return False, f"peers runner {script} is missing"
    probe = subprocess.run(
        [str(py), str(script), "--versions"], capture_output=True, text=True, timeout=300, check=False
    )
    if probe.returncode != 0:
        return False, f"peers runner does not start under {py}: {probe.stderr.strip()[-500:]}"
    versions = json.loads(probe.stdout)
    needed = ("transformers", "kvpress") if require_kvpress else ("transformers",)
    missing = [d for d in needed if versions.get(d) == "not installed"]
    if missing:
        return False, f"{', '.join(missing)} not installed in {py} (run `make peers-venv`)"
    return True, "ok"


# ------------------------------------------------------------------------------------------------
# Job inputs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeerMethod:
    """One peer configuration.

    Attributes:
        name: one of :data:`PEER_METHODS`.
        params: the method's hyperparameters: ``compression_ratio`` (fraction of the compressed
            tokens removed, ``[0, 1)``) and press options for kvpress presses; ``backend``
            (``"quanto"``/``"hqq"``), ``nbits``, ``q_group_size``, ``residual_length``,
            ``axis_key``/``axis_value`` for ``quantized_cache``; ``compress_question`` (bool) for
            all. The runner checks them strictly and fills in defaults.
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in PEER_METHODS:
            raise ValueError(f"unknown peer method {self.name!r}; accepted: {', '.join(PEER_METHODS)}")
        if not isinstance(self.params, Mapping) or not all(isinstance(k, str) for k in self.params):
            raise ValueError(f"params of {self.name!r} must be a mapping with string keys, got {self.params!r}")

    @property
    def label(self) -> str:
        """Short name for tables: ``snapkv r=0.5``, ``snapkv+question r=0.5``, ``hqq 4-bit``."""
        return _label(self.name, dict(self.params))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


def _label(name: str, params: Mapping[str, Any]) -> str:
    q = "+question" if params.get("compress_question") else ""
    if name == "quantized_cache":
        return f"{params.get('backend', '?')}{q} {params.get('nbits', 4)}-bit"
    if "compression_ratio" in params:
        return f"{name}{q} r={params['compression_ratio']:g}"
    return f"{name}{q}"


PRESS_METHODS: tuple[str, ...] = ("snapkv", "streaming_llm", "expected_attention", "knorm", "tova")
"""The kvpress presses; their spec value is the compression ratio."""
CACHE_BACKENDS: tuple[str, ...] = ("quanto", "hqq")
"""``QuantizedCache`` backends; their spec value is the bit width."""


def parse_peer_spec(spec: str) -> PeerMethod:
    """A peer from its command-line spec.

    ``PRESS[+question]:RATIO`` (``tova:0.5``, ``snapkv+question:0.25``) for the kvpress presses,
    ``quanto:BITS`` / ``hqq:BITS`` (``hqq:4``) for ``QuantizedCache``, ``full`` for the
    uncompressed model in the peers' environment.
    """
    accepted = (
        f"accepted: PRESS[+question]:RATIO with PRESS in {', '.join(PRESS_METHODS)} and RATIO in [0, 1); "
        f"quanto:BITS or hqq:BITS (quanto 2 or 4, hqq 1, 2, 3, 4 or 8); full"
    )
    text = str(spec).strip()
    head, _, value = text.partition(":")
    name, plus, flag = head.partition("+")
    if plus and flag != "question":
        raise ValueError(f"peer {spec!r}: unknown option '+{flag}' ({accepted})")
    params: dict[str, Any] = {"compress_question": True} if plus else {}
    if name == "full" and not value and not plus:
        return PeerMethod("full")
    if name in PRESS_METHODS:
        try:
            ratio = float(value)
        except ValueError:
            raise ValueError(f"peer {spec!r}: {name} needs a compression ratio, e.g. {name}:0.5 ({accepted})") from None
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"peer {spec!r}: compression ratio {ratio:g} is outside [0, 1)")
        return PeerMethod(name, {"compression_ratio": ratio, **params})
    if name in CACHE_BACKENDS:
        bits = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}[name]
        if not value.isdigit() or int(value) not in bits:
            raise ValueError(f"peer {spec!r}: {name} takes a bit width in {bits}, e.g. {name}:{bits[-1]} ({accepted})")
        return PeerMethod("quantized_cache", {"backend": name, "nbits": int(value), **params})
    raise ValueError(f"unknown peer {spec!r} ({accepted})")


@dataclass(frozen=True)
class PeerPrompt:
    """A complete prompt (template applied) with the question's character span, as kvcomp gets it."""

    id: str
    text: str
    question_span: tuple[int, int] | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("prompt id must be a non-empty string")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop of prompt {self.id!r} must be a sequence of non-empty strings, got {self.stop!r:.80}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"prompt {self.id!r} is empty")
        if self.question_span is not None:
            start, end = self.question_span
            if not 0 <= start < end <= len(self.text):
                raise ValueError(
                    f"question_span {self.question_span} of prompt {self.id!r} is not a character range inside "
                    f"its {len(self.text)} characters"
                )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "text": self.text}
        if self.question_span is not None:
            out["question_span"] = [int(self.question_span[0]), int(self.question_span[1])]
        if self.stop:
            out["stop"] = list(self.stop)
        return out
