"""scripts/setup.sh and scripts/main.sh cannot fail silently (issue 16, item 2).

The shared virtual environment is never touched: PSEUDONYMISE_VENV points the scripts at one in the test's
temporary folder. The main job's test makes that environment see the already installed requirements through a
``.pth`` file (so setup.sh's pip finds every pin satisfied instead of downloading 1 GB) and runs main.sh as
the README says, twice, then with --fresh.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bash(script: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def venv_problem(path: Path) -> subprocess.CompletedProcess[str]:
    return bash(f'source scripts/setup.sh && venv_problem "{path}"', {"SETUP_DEFINE_ONLY": "1"})


def test_a_broken_virtual_environment_is_named(tmp_path: Path) -> None:
    """Each way a .venv is found broken, named; a healthy one (this test's own) and an absent one are not."""
    assert venv_problem(tmp_path / "absent").returncode == 1
    healthy = venv_problem(Path(sys.prefix))
    assert (healthy.returncode, healthy.stdout) == (1, "")
    no_python = tmp_path / "no-python"
    (no_python / "bin").mkdir(parents=True)
    assert venv_problem(no_python).stdout == "it has no bin/python\n"
    dead = tmp_path / "dead"
    (dead / "bin").mkdir(parents=True)
    (dead / "bin" / "python").write_text("#!/bin/sh\nexit 3\n")
    (dead / "bin" / "python").chmod(0o755)
    assert "its python does not start" in venv_problem(dead).stdout
    no_pip = tmp_path / "no-pip"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(no_pip)], check=True)
    assert venv_problem(no_pip).stdout == "it has no pip\n"
    (no_pip / ".installing").touch()
    assert venv_problem(no_pip).stdout == "an earlier install into it was interrupted\n"


def test_setup_rebuilds_a_broken_environment_and_shows_why_a_step_failed(tmp_path: Path) -> None:
    """An interrupted install is seen, the environment removed and made again; when making it fails, the
    error and the last lines of the log say why (here a Python whose venv module fails, as a missing
    ensurepip does), instead of a later ModuleNotFoundError."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installing").touch()
    fake = tmp_path / "python3"
    fake.write_text('#!/bin/sh\n[ "$1" = "-c" ] && exit 0\necho "Error: ensurepip returned 1 (no network?)" >&2\n'
                    "exit 1\n")
    fake.chmod(0o755)
    log = tmp_path / "setup.log"
    proc = bash("source scripts/setup.sh", {"PSEUDONYMISE_VENV": str(venv), "PYTHON": str(fake),
                                            "SETUP_LOG": str(log)})
    assert proc.returncode == 1
    assert f"==> {venv} is broken (an earlier install into it was interrupted): removing it and making it again" \
        in proc.stdout
    assert f"error: creating {venv} failed; the last lines of {log}:" in proc.stderr
    assert "ensurepip returned 1 (no network?)" in proc.stderr
    assert not venv.exists()


def test_requirements_are_counted_through_includes(tmp_path: Path) -> None:
    (tmp_path / "runtime.txt").write_text("# pins\napache-airflow==3.1.0\n\npandas==2.2.3  # frames\n")
    (tmp_path / "all.txt").write_text("-r runtime.txt\n--index-url https://example.invalid\npytest==8.3.0\n")
    proc = bash(f'source scripts/setup.sh && count_requirements "{tmp_path / "all.txt"}"', {"SETUP_DEFINE_ONLY": "1"})
    assert proc.stdout == "3\n"


def _pseudonyms(work: Path) -> list[tuple[str, ...]]:
    with sqlite3.connect(work / "research.db") as conn:
        return conn.execute("SELECT * FROM patient_visits_pseudonymised ORDER BY rowid").fetchall()


@pytest.mark.slow
@pytest.mark.airflow
def test_main_job_keeps_its_issuer_between_runs(tmp_path: Path) -> None:
    """main.sh twice gives the same pseudonyms (the issuer and the token are kept in the state folder), and
    says what to run next; --fresh starts over with a new issuer, so new pseudonyms."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "shared-requirements.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {"PSEUDONYMISE_VENV": str(venv), "SETUP_LOG": str(tmp_path / "setup.log"), "PYTHONPATH": ""}
    work = tmp_path / "example"
    first = bash(f'bash scripts/main.sh --work "{work}"', env, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "==> installing pinned requirements from requirements.txt (" in first.stdout \
        or "==> installing runtime requirements from requirements-runtime.txt (" in first.stdout
    assert "1. issuer, project and token, with the pseudonymise CLI" in first.stdout
    assert "What next:" in first.stdout and "bash scripts/ui.sh" in first.stdout and "scripts/test.sh" in first.stdout
    assert f"export PSEUDONYMISE_STORE={work}-state/issuer" in first.stdout
    pseudonyms = _pseudonyms(work)
    assert len(pseudonyms) == 24
    second = bash(f'bash scripts/main.sh --work "{work}"', env, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "installing" not in second.stdout  # the environment is up to date: nothing installed again
    assert f"1. issuer and project kept from an earlier run in {work}-state" in second.stdout
    assert _pseudonyms(work) == pseudonyms
    fresh = bash(f'bash scripts/main.sh --work "{work}" --fresh', env, timeout=1200)
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    renewed = _pseudonyms(work)
    assert [r[0] for r in renewed] != [r[0] for r in pseudonyms] and [r[1:] for r in renewed] == \
        [r[1:] for r in pseudonyms]
