"""The README's main job works: the example DAG end to end on the embedded default (SQLite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.airflow
@pytest.mark.slow
def test_main_job_runs_the_example_dag_on_sqlite(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/run_example.py"), "--work", str(tmp_path / "example")],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "rows in (hospital source) 24, rows out (research table) 24" in out
    assert "audit chain verified: 2 rows" in out
    assert "pseudonymise success" in out
    token = (tmp_path / "example-state" / "research-a.token").read_text().strip()  # kept between runs
    assert token not in out and token not in proc.stderr
    assert token not in (tmp_path / "example" / "dags-test.log").read_text()
