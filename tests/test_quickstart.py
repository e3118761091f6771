"""The README's main job works: the example DAG end to end on the embedded default (SQLite), then its dry run."""

from __future__ import annotations

import json
import os
import shlex
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

    # the README's dry run, right after the main job, with the token and issuer it made
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("Test first", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    command = shlex.split(block.replace("\\\n", " ").replace("var/example", str(tmp_path / "example")))
    env_name, env_value = command[0].split("=", 1)
    assert command[1] == ".venv/bin/pseudonymise" and "--dry-run" in command
    dry = subprocess.run([sys.executable, "-m", "pseudonymise.cli", *command[2:]], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False, env={**os.environ, env_name: env_value})
    assert dry.returncode == 0, dry.stderr[-3000:]
    report = json.loads(dry.stdout)
    assert report["operation"] == "dry_run" and report["dry_run"]["sample_rows"] == 100
    assert report["dry_run"]["risk"]["k"] == 5 and "dry run: nothing was written" in dry.stderr
    assert not (tmp_path / "example" / "extract.csv").exists()
    assert token not in dry.stdout + dry.stderr
