"""``bench/greedy_tokens.py --checkout``: the older code really is the code that runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=BENCH)


def test_checkout_imports_kvcore_from_that_folder_not_from_the_install(tmp_path: Path) -> None:
    # A stand-in checkout whose kvcore announces itself: the editable install must not win over it.
    (tmp_path / "kvcore").mkdir()
    (tmp_path / "kvcore" / "__init__.py").write_text("MARK = 'older checkout'\n")
    proc = _python(f"import greedy_tokens as g; from pathlib import Path; g.use_checkout(Path({str(tmp_path)!r}));"
                   "import kvcore; print(kvcore.MARK)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "older checkout"


def test_checkout_without_kvcore_is_refused_by_name(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "greedy_tokens.py"), "--checkout", str(tmp_path), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"--checkout {tmp_path}: no kvcore/ package there" in proc.stderr
    assert not (tmp_path / "x.json").exists()
