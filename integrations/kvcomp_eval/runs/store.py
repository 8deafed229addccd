"""The run folder's files: ``results.jsonl`` and ``run.json``, owned here and nowhere else.

:class:`ResultsStore` is the only code that reads or writes them: the row format and the row
key, appending (each row one whole line, flushed and fsynced, Ctrl-C held until it is down),
repairing a cut-off last line, the check that a folder holds the same run before resuming it,
and the ``run.json`` record of every run. The benchmark appends through it; the report and the
plots read through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvcore.config import CompressionConfig
from kvcomp_eval.runs.suite import normalised_dir

if TYPE_CHECKING:
    from kvcomp_eval.peers.methods import PeerMethod



REFERENCE = "full"
"""Name of the uncompressed reference config; reserved, always run first."""
RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"


# -- files ----------------------------------------------------------------------------------------
def config_hash(config: CompressionConfig) -> str:
    """12 hex digits of SHA-256 over the resolved config (defaults filled in, description left out).

    Component parameters that are ``None`` (an option left off) are left out too, so a new
    optional parameter does not make every earlier result row look like another config's.
    """
    data = config.resolved().to_dict()
    data.pop("description", None)
    for kind in config.sections():
        data[kind] = {key: value for key, value in data[kind].items() if value is not None}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def peer_hash(method: PeerMethod) -> str:
    """12 hex digits of SHA-256 over a peer's name and parameters (as given; the runner fills defaults)."""
    data = {"peer": method.to_json()}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def row_key(row: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """``(config, suite, example_id, config_hash)``: what makes a result row unique."""
    return (str(row["config"]), str(row["suite"]), str(row["example_id"]), str(row["config_hash"]))


def read_results(path: str | os.PathLike[str], repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a ``results.jsonl``; a last line without its newline is a write that was cut off.

    Rows are only ever written whole (one ``write`` of the line and its newline), so the only
    damage an interruption can leave is an unterminated last line: it is ignored, and with
    ``repair=True`` cut from the file so appends start on a clean line. A complete line that is
    not JSON means the file was edited by hand: that is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(
            f"kvcomp bench: {path}: ignoring an unfinished last line ({len(data) - end} bytes, an interrupted write)",
            file=sys.stderr,
        )
        if repair:
            with path.open("r+b") as fh:
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
    rows = []
    for line_no, line in enumerate(data[:end].decode("utf-8").split("\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {line_no}: not a JSON result row ({exc.msg})") from exc
        if not isinstance(row, dict) or not {"config", "suite", "example_id", "config_hash"} <= row.keys():
            raise ValueError(f"{path}, line {line_no}: not a result row (needs config, suite, example_id, config_hash)")
        rows.append(row)
    return rows


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, so a row is never half written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


class ResultsWriter:
    """Appends one JSON line per row: written whole, flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
        with _sigint_deferred():
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def machine_info(device: str) -> dict[str, Any]:
    """Platform, CPU count, library versions and the device the run used."""
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_run_dir(out_dir: Path, identity: Mapping[str, Any]) -> dict[str, Any] | None:
    """The folder's stored ``run.json`` (or ``None`` for a new folder); refuses another set-up."""
    run_file = out_dir / RUN_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} exists and is not a folder")
    if not run_file.is_file():
        if (out_dir / RESULTS_FILE).is_file():
            raise ValueError(f"{out_dir} has {RESULTS_FILE} but no {RUN_FILE}: not a folder this benchmark wrote")
        return None
    try:
        stored = json.loads(run_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{run_file} is not valid JSON ({exc.msg}); use another --out folder") from exc
    old = stored.get("identity", {})
    diffs = []
    for section in sorted(set(old) | set(identity)):
        a, b = _dirs_normalised(old.get(section)), _dirs_normalised(identity.get(section))
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{section}.{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            diffs.append(f"{section}: {a!r} there, {b!r} now")
    if diffs:
        raise ValueError(
            f"{out_dir} holds results of a different run, so they cannot be resumed or mixed:\n  "
            + "\n  ".join(diffs)
            + "\nUse another --out folder (or delete this one)."
        )
    return stored


def _dirs_normalised(section: Any) -> Any:
    """A section of a run's identity with its folder fields (``*_dir``) in one spelling: folders
    written by older releases kept ``..`` in them (``/a/main/../data``)."""
    if not isinstance(section, dict):
        return section
    return {k: normalised_dir(v) if k.endswith("_dir") and isinstance(v, str) else v for k, v in section.items()}


def load_run_info(out_dir: Path) -> dict[str, Any]:
    """``run.json`` as a dict, or ``{}`` when absent."""
    path = out_dir / RUN_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg})") from exc


class ResultsStore:
    """One run folder: its ``results.jsonl`` rows and its ``run.json`` record.

    Parameters
    ----------
    out_dir:
        The run folder (created on the first :meth:`record_run`).
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)

    @property
    def results_path(self) -> Path:
        return self.out_dir / RESULTS_FILE

    @property
    def run_path(self) -> Path:
        return self.out_dir / RUN_FILE

    def check(self, identity: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored ``run.json`` (``None`` for a new folder); refuses a folder of another run."""
        return check_run_dir(self.out_dir, identity)

    def has_results(self) -> bool:
        return self.results_path.is_file()

    def rows(self, repair: bool = False) -> list[dict[str, Any]]:
        """Every complete row (see :func:`read_results`)."""
        return read_results(self.results_path, repair=repair)

    def run_info(self) -> dict[str, Any]:
        """``run.json`` as a dict, or ``{}`` when absent."""
        return load_run_info(self.out_dir)

    @contextlib.contextmanager
    def appender(self) -> Iterator[ResultsWriter]:
        """A writer that appends rows to ``results.jsonl`` (closed on leaving the block)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        writer = ResultsWriter(self.results_path)
        try:
            yield writer
        finally:
            writer.close()

    def record_run(
        self,
        *,
        experiment: str,
        identity: Mapping[str, Any],
        model: str,
        suite: Mapping[str, Any],
        configs: Mapping[str, Mapping[str, Any]],
        variants: Mapping[str, Mapping[str, Any]],
        notes: Sequence[str],
        run: Mapping[str, Any],
    ) -> None:
        """Add one run to ``run.json``, merged with what earlier runs of the folder stored.

        ``configs`` (``{name: {"hash", "config"}}``, in this run's order) come first, then the
        names only earlier runs had; variants and notes add up; ``run`` is appended to ``runs``.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stored = self.run_info()
        known = dict(stored.get("configs", {}))
        ordered = {name: dict(entry) for name, entry in configs.items()}
        ordered.update({n: v for n, v in known.items() if n not in ordered})
        merged_variants = dict(stored.get("variants", {}))
        merged_variants.update({k: dict(v) for k, v in variants.items()})
        merged_notes = list(stored.get("notes", []))
        merged_notes += [n for n in notes if n not in merged_notes]
        write_json_atomic(
            self.run_path,
            {
                "format": 1,
                "experiment": experiment,
                "identity": dict(identity),
                "model": model,
                "suite": dict(suite),
                "configs": ordered,
                "variants": merged_variants,
                "notes": merged_notes,
                "runs": [*stored.get("runs", []), dict(run)],
            },
        )

    def record_peer_versions(self, versions: Mapping[str, str]) -> None:
        """Add the peers' library versions to the last run in ``run.json``."""
        info = json.loads(self.run_path.read_text(encoding="utf-8"))
        info["runs"][-1]["peer_versions"] = dict(versions)
        write_json_atomic(self.run_path, info)
