"""``--model_args`` of ``kvcomp-llama``: parsed, validated and turned into a compression config.

Everything is checked here, before any weights are loaded: an unknown argument, a value of the
wrong type, an unknown preset or component, or a component parameter its plugin refuses all end
in a ``ValueError`` that names the bad value and what is accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvcore.config import CompressionConfig, ConfigError, format_validation_error, load_config

COMPONENT_KINDS = ("scorer", "quantizer", "propagator")
CONFIG_FIELDS = ("window_size", "n_sink", "weights")
"""Top-level :class:`~kvcore.config.CompressionConfig` fields that ``model_args`` may set directly."""


class KVCompLMArgs(BaseModel):
    """The model arguments of ``kvcomp-llama`` (component parameters excluded; see :func:`parse_model_args`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    pretrained: str = Field(default="smollm2-135m", min_length=1)
    """Model preset (``smollm2-135m``, ``llama2-7b``, ...), Hugging Face folder, ``.gguf`` file or hub id."""
    preset: str | None = None
    """Compression preset (``default``, ``full``, ``fast``, ...); default ``default`` when no ``config``."""
    config: str | None = None
    """YAML/JSON compression config file (instead of ``preset``)."""
    scorer: str | None = None
    quantizer: str | None = None
    propagator: str | None = None
    max_length: int | None = Field(default=None, ge=2)
    """Token budget of prompt plus generated tokens (default: the model's ``max_position_embeddings``)."""
    max_gen_toks: int = Field(default=256, ge=1)
    """New tokens when a task's ``generation_kwargs`` name none."""
    truncate: Literal["middle", "error"] = "middle"
    """Over-long generation prompt: keep its first and last halves (LongBench's rule) or refuse it."""
    loglikelihood: Literal["compressed", "full"] = "compressed"
    """Score continuations through the compressed cache of the context, or on the uncompressed forward."""
    question_from_doc: bool = True
    """Guide the scorer with the document's ``question``/``input`` field when it occurs in the prompt."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:1``...; default ``cuda`` when available, else ``cpu``."""
    seed: int = 1234
    """Seed of sampled generation (request ``i`` uses ``seed + i``)."""
    batch_size: int | str = 1
    """Generation requests per left-padded batch (lm-eval's ``--batch_size``; a digit string is
    taken too). ``auto`` is refused: probing memory for a batch size is not implemented."""
    max_batch_size: int | None = None

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size_is_a_positive_int(cls, value: Any) -> int:
        number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"batch_size must be a positive integer (e.g. --batch_size 4), got {value!r}")
        return number


def parse_model_args(kwargs: dict[str, Any]) -> tuple[KVCompLMArgs, CompressionConfig]:
    """Split ``model_args`` into the LM's own arguments and a validated compression config.

    Keys with a dot (``scorer.alpha=0.5``, ``quantizer.frac_drop=0.3``) and the config fields
    ``window_size``, ``n_sink``, ``weights`` override the preset or config file through
    :meth:`~kvcore.config.CompressionConfig.with_overrides`; ``scorer=NAME`` (likewise
    ``quantizer``, ``propagator``) selects a component, starting from its own defaults when the
    name changes.

    Raises:
        ValueError: an unknown argument or bad value (:class:`~kvcore.config.ConfigError` and
            :class:`~kvcore.registry.ComponentError` are ``ValueError`` subclasses too).
    """
    own: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"model_args: bad argument name {key!r}")
        head, dot, _ = key.partition(".")
        if dot:
            if head not in COMPONENT_KINDS:
                raise ValueError(
                    f"model_args: {key!r} is not a component parameter; dotted arguments start with "
                    f"{', '.join(k + '.' for k in COMPONENT_KINDS)} (e.g. scorer.alpha=0.5)"
                )
            overrides[key] = value
        elif key in CONFIG_FIELDS:
            overrides[key] = value
        else:
            own[key] = value
    unknown = sorted(set(own) - set(KVCompLMArgs.model_fields))
    if unknown:
        accepted = sorted(KVCompLMArgs.model_fields) + list(CONFIG_FIELDS) + [f"{k}.PARAM" for k in COMPONENT_KINDS]
        raise ValueError(f"kvcomp-llama: unknown model_args {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    try:
        args = KVCompLMArgs(**own)
    except ValidationError as exc:
        raise ValueError(f"kvcomp-llama: invalid model_args:\n{format_validation_error(exc)}") from exc

    if args.preset and args.config:
        raise ConfigError("kvcomp-llama: give either preset= or config=, not both")
    config = load_config(preset=args.preset, config_file=args.config)
    # A new component name resets its parameters, so names go first and dotted parameters after.
    ordered = {f"{kind}.name": getattr(args, kind) for kind in COMPONENT_KINDS if getattr(args, kind)}
    ordered.update({k: v for k, v in overrides.items() if k.endswith(".name")})
    ordered.update({k: v for k, v in overrides.items() if not k.endswith(".name")})
    if ordered:  # an unknown component or a refused parameter is refused here, listing the choices
        config = config.with_overrides(ordered)
    return args, config
