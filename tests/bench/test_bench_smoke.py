"""The benchmark (bench/run.py) on a tiny table, so it never rots: every case runs and every check passes.

Not timed: figures at 2,000 rows say nothing; the full run is documented in the README.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    for case in ("(a) raw COPY", "(b) pseudonymise: deterministic", "(c) pseudonymise: reversible",
                 "(d) secondary", "(e) naive: pandas", "(f) in-database: pgcrypto", "2 mapped key ranges",
                 "(g) SQLite raw copy", "(h) pseudonymise SQLite -> SQLite"):
        assert case in proc.stdout, f"{case!r} missing from the output"
    for check in ("(b) equals pgcrypto", "(f) equals pgcrypto", "(c) equals pgcrypto",
                  "(c) one escrow row per distinct value", "(c) escrow reveals the originals",
                  "(d) equals pgcrypto", "2 mapped ranges equal (b)", "(h) equals the standard library's hmac"):
        assert f"[ok] {check}" in proc.stdout, f"check {check!r} did not pass"
    assert "speedup of 2 mapped range tasks over one task on LocalExecutor" in proc.stdout
    assert "[ok] both runs wrote every row, the same" in proc.stdout
    assert "checks: all passed" in proc.stdout
    assert "FAILED" not in proc.stdout
