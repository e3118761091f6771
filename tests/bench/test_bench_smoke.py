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
                 "(g) SQLite raw copy", "(g') SQLite's own copy", "(h) pseudonymise SQLite -> SQLite", "(i) (b) with a risk gate",
                 "(j) (h) with the same gate", "(k) dry run of (b)", "(l) RiskReportOperator",
                 "(m) de-identify: (b) + visit_date shifted per patient"):
        assert case in proc.stdout, f"{case!r} missing from the output"
    for check in ("(b) equals pgcrypto", "(f) equals pgcrypto", "(c) equals pgcrypto",
                  "(c) one escrow row per distinct value", "(c) escrow reveals the originals",
                  "(d) equals pgcrypto", "2 mapped ranges equal (b)", "(h) equals the standard library's hmac",
                  "(g') equals the source", "(h) ran inside SQLite",
                  "(i) equals pgcrypto", "(i) gate figures equal the standard library's",
                  "(j) equals the standard library's hmac", "(j) counts spilled to disk",
                  "(j) gate figures equal the standard library's", "(k) dry run wrote nothing",
                  "(k) dry run's figures equal the standard library's over its sample",
                  "(l) report figures equal the standard library's", "(l) report over visit_date alone",
                  "(l) report over ward alone", "(m) equals pgcrypto (pseudonyms, date shift, mask, prefix)"):
        assert f"[ok] {check}" in proc.stdout, f"check {check!r} did not pass"
    for case in ("CSV: pyarrow read_csv + write_csv", "CSV: pseudonymise file pseudonymise",
                 "CSV: hand-written csv module + hmac", "CSV: Presidio structured engine",
                 "Parquet: pyarrow read_table + write_table", "Parquet: pseudonymise file pseudonymise",
                 "CSV: the CLI with date_shift, mask and generalise",
                 "Parquet: the CLI with date_shift, mask and generalise"):
        assert f"| {case}" in proc.stdout, f"file case {case!r} missing from the table"
    for check in ("file copy equals the source", "file CLI equals docs/design.md §4 (stdlib hmac)",
                  "hand-written csv + hmac equals the CLI byte for byte", "Presidio equals sha256(value + salt)",
                  "Parquet copy equals the source", "Parquet CLI equals docs/design.md §4 (stdlib hmac)",
                  "CSV de-identified CLI equals docs/design.md §4/§4.7 (stdlib)",
                  "Parquet de-identified CLI equals docs/design.md §4/§4.7 (stdlib)"):
        assert f"[ok] {check}" in proc.stdout, f"check {check!r} did not pass"
    assert "file CLI rows/s / CSV copy-through rows/s" in proc.stdout
    assert "speedup of 2 mapped range tasks over one task on LocalExecutor" in proc.stdout
    assert "predicted rows/s, PostgreSQL on its own machine of 16 cores" in proc.stdout  # the scaling model ran
    assert "| (c) reversible |" in proc.stdout
    assert "ratios to (a), each run over the (a) run of its repetition" in proc.stdout
    assert "(b) rows/s / (a) rows/s: " in proc.stdout and "(c) rows/s / (a) rows/s: " in proc.stdout
    assert "speedup of 2 mapped range tasks over one task on CeleryExecutor (2 workers)" in proc.stdout
    # LocalExecutor and Celery, each printed as it runs and again in the summary
    assert proc.stdout.count("[ok] both runs wrote every row, the same") == 4
    assert "the 2 mapped range tasks ran on Celery worker(s): stack-worker-" in proc.stdout
    assert "checks: all passed" in proc.stdout
    assert "FAILED" not in proc.stdout
