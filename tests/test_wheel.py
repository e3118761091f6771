"""The package as a user installs it: a wheel and an sdist built with ``python -m build``, installed into a
fresh virtual environment holding only Airflow (the pinned release) and the wheel, then named by
``airflow providers list``, its UI plugin loaded by ``airflow plugins``, and the example DAG run to success.

Everything runs in subprocesses with an environment of their own (no ``PYTHONPATH``, no ``AIRFLOW_*``), so
nothing of this checkout is importable there: what runs is what the wheel installed.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reference import token_pseudonyms

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "airflow-provider-pseudonymise"
pytestmark = [pytest.mark.slow, pytest.mark.airflow]


def _pin(name: str) -> str:
    """The version of ``name`` pinned in requirements-runtime.txt."""
    for line in (ROOT / "requirements-runtime.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in requirements-runtime.txt")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: none of the test session's import path or Airflow settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("AIRFLOW")}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 600) -> str:
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(args[:5])} … exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _copy_source(dest: Path) -> Path:
    """The checkout as a fresh clone has it: no virtual environment, build output or built C module."""
    ignore = shutil.ignore_patterns(".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                    ".pytest_cache", ".ruff_cache", "test-artifacts", ".airflow", "tests", "bench")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The sdist and wheel of ``python -m build``, and a wheel built from the sdist with no C compiler."""
    work = tmp_path_factory.mktemp("build")
    src = _copy_source(work / "src")
    dist = work / "dist"
    started = time.monotonic()
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)], _clean_env(), work)
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    # CC=/bin/false: the compiler "fails", as on a machine without gcc or OpenSSL's headers
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(work / "pure"), str(sdist)],
         _clean_env(CC="/bin/false"), work)
    (pure,) = (work / "pure").glob("*.whl")
    print(f"built sdist, wheel and pure-Python wheel in {time.monotonic() - started:.1f} s")
    yield {"sdist": sdist, "wheel": wheel, "pure": pure, "work": work}


@pytest.fixture(scope="module")
def fresh_venv(built: dict[str, Path]) -> Path:
    """A new virtual environment with the pinned Airflow and the pure-Python wheel, nothing else asked for."""
    target = built["work"] / "venv"
    started = time.monotonic()
    venv.EnvBuilder(with_pip=True).create(target)
    _run([str(target / "bin/python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "requirements-runtime.txt"),
          f"apache-airflow=={_pin('apache-airflow')}", str(built["pure"])], _clean_env(), built["work"], timeout=900)
    print(f"fresh virtual environment with Airflow and the wheel in {time.monotonic() - started:.1f} s")
    return target


def test_the_sdist_and_wheel_hold_the_package_and_no_more(built: dict[str, Path]) -> None:
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = whl.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(meta).decode()
        entry_points = whl.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert any(re.fullmatch(r"pseudonymise/core/_native\.cpython-311-.*\.so", n) for n in names), \
        "gcc and libssl-dev are here: the wheel must carry the C engine"
    assert {"pseudonymise/plugin/templates/audit.html", "pseudonymise/operators.py", "pseudonymise/hooks.py",
            "pseudonymise/cli.py", "pseudonymise/core/_native.pyi"} <= set(names)
    assert not [n for n in names if n.endswith(".c") or n.startswith("tests/") or "__pycache__" in n]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Name: airflow-provider-pseudonymise" in metadata and "License-Expression: Apache-2.0" in metadata
    for extra in ("postgres", "vault", "celery", "openlineage"):
        assert f"Provides-Extra: {extra}" in metadata
    assert re.search(r"Requires-Dist: apache-airflow<4,>=3\.1", metadata)
    assert "provider_info = pseudonymise:get_provider_info" in entry_points
    assert "pseudonymise = pseudonymise.plugin:PseudonymisePlugin" in entry_points
    assert "pseudonymise = pseudonymise.cli:main" in entry_points

    with tarfile.open(built["sdist"]) as sdist:
        members = [m.split("/", 1)[1] for m in sdist.getnames() if "/" in m]
    assert {"setup.py", "pyproject.toml", "LICENSE", "README.md", "plugins/pseudonymise/core/_native.c"} <= set(members)
    assert not [m for m in members if m.startswith("tests/") or m.endswith(".so")]

    with zipfile.ZipFile(built["pure"]) as whl:
        assert not [n for n in whl.namelist() if n.endswith(".so")], "CC=/bin/false must give a wheel without C"


def test_the_pure_python_wheel_gives_the_reference_pseudonyms(fresh_venv: Path, tmp_path: Path) -> None:
    """Built without a compiler, the package still works: the CLI's pseudonyms are docs/design.md §4's."""
    python, cli = str(fresh_venv / "bin/python"), str(fresh_venv / "bin/pseudonymise")
    env = _clean_env(PSEUDONYMISE_STORE=str(tmp_path / "issuer"))
    where = _run([python, "-c", "import pseudonymise, pseudonymise.core.native as n; print(pseudonymise.__file__, n.available())"],
                 env, tmp_path)
    path, available = where.split()
    assert path.startswith(str(fresh_venv)) and available == "False"
    token = _issue_token(cli, env, tmp_path)
    out = tmp_path / "out.csv"
    _run([cli, "file", "pseudonymise", str(ROOT / "include/sample/patients.csv"), str(out), "--policy",
          str(ROOT / "include/policies/patients.json"), "--token-file", str(tmp_path / "research-a.token"),
          "--issuer-keys", str(tmp_path / "issuer.jwks")], env, tmp_path)
    with open(ROOT / "include/sample/patients.csv", newline="", encoding="utf-8") as fh:
        ids = [row["patient_id"].strip().upper() or None for row in csv.DictReader(fh)]
    with open(out, newline="", encoding="utf-8") as fh:
        got = [row["patient_id"] or None for row in csv.DictReader(fh)]
    assert got == token_pseudonyms(token, ids)


def test_installed_wheel_is_a_provider_with_its_plugin_and_runs_the_example_dag(
        fresh_venv: Path, built: dict[str, Path], tmp_path: Path) -> None:
    """The wheel with its C engine replaces the pure one; Airflow names the provider and loads its plugin, and
    ``airflow dags test`` runs the example DAG (SQLite source, target and metadata) to success."""
    python, cli, airflow = (str(fresh_venv / "bin" / n) for n in ("python", "pseudonymise", "airflow"))
    started = time.monotonic()
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(built["wheel"])],
         _clean_env(), tmp_path)
    env = _clean_env(PSEUDONYMISE_STORE=str(tmp_path / "issuer"))
    assert _run([python, "-c", "import pseudonymise.core.native as n; print(n.available())"], env, tmp_path).strip() \
        == "True"

    # the example DAG and its include/ folder, as a user copies them into their dags folder
    dags = tmp_path / "project" / "dags"
    dags.mkdir(parents=True)
    shutil.copy(ROOT / "dags/patient_research_extract.py", dags)
    (dags / "readme_minimal.py").write_text(_readme_minimal_dag())
    shutil.copytree(ROOT / "include", tmp_path / "project" / "include")
    token = _issue_token(cli, env, tmp_path)
    hospital, research = tmp_path / "hospital.db", tmp_path / "research.db"
    with sqlite3.connect(hospital) as conn, open(ROOT / "include/sample/patients.csv", newline="", encoding="utf-8") as fh:
        conn.execute("CREATE TABLE patient_visits (patient_id TEXT, name TEXT, birth_year INTEGER, visit_date TEXT,"
                     " diagnosis_code TEXT, ward TEXT)")
        conn.executemany("INSERT INTO patient_visits VALUES (?, ?, ?, ?, ?, ?)",
                         [tuple(v or None for v in row) for row in list(csv.reader(fh))[1:]])
    airflow_env = {
        **env,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_PSEUDONYMISE_RESEARCH": json.dumps({
            "conn_type": "pseudonymise", "password": token,
            "extra": {"issuer_keys": (tmp_path / "issuer.jwks").read_text(), "project": "research-a"}}),
        "AIRFLOW_CONN_HOSPITAL_DB": json.dumps({"conn_type": "sqlite", "host": str(hospital)}),
        "AIRFLOW_CONN_RESEARCH_DB": json.dumps({"conn_type": "sqlite", "host": str(research)}),
    }

    providers = json.loads(_run([airflow, "providers", "list", "--output", "json"], airflow_env, tmp_path))
    ours = [p for p in providers if p["package_name"] == PACKAGE]
    assert ours and ours[0]["version"] == _installed_version(python, airflow_env, tmp_path), providers
    plugins = json.loads(_run([airflow, "plugins", "--output", "json"], airflow_env, tmp_path))
    ours = [p for p in plugins if p["name"] == "pseudonymise"]
    assert len(ours) == 1, plugins
    assert ours[0]["source"].startswith(f"{PACKAGE}=="), ours  # from the wheel's entry point, not a plugins folder
    assert any("/pseudonymise" in str(app) for app in (ours[0].get("fastapi_apps") or [])), ours

    _run([airflow, "db", "migrate"], airflow_env, tmp_path)
    out = _run([airflow, "dags", "test", "pseudonymise_patient_extract", "2026-11-03"], airflow_env, tmp_path)
    assert token not in out
    with sqlite3.connect(hospital) as src, sqlite3.connect(research) as dst:
        outcomes = [r[0] for r in dst.execute("SELECT outcome FROM pseudonymise_audit ORDER BY seq")]
        # the run's data interval, as the timetable inferred it for that date
        start, end = dst.execute("SELECT substr(data_interval_start, 1, 10), substr(data_interval_end, 1, 10) "
                                 "FROM pseudonymise_audit WHERE outcome = 'success'").fetchone()
        ids = [r[0] for r in src.execute("SELECT patient_id FROM patient_visits WHERE visit_date >= ? AND visit_date < ?",
                                         (start, end))]
        got = [r[0] for r in dst.execute("SELECT patient_id FROM patient_visits_pseudonymised")]
    assert ids, f"the sample has visits in [{start}, {end})"
    # the target's row order is the load's, not the source's: compare the pseudonyms as multisets
    expected = token_pseudonyms(token, [None if v is None else v.strip().upper() for v in ids])
    assert sorted(got, key=str) == sorted(expected, key=str)
    assert outcomes == ["started", "success"]

    # the README's minimal DAG, as printed there, on the same connections: the same rows, a second use audited
    _run([airflow, "dags", "test", "pseudonymise_visits", "2026-11-03"], airflow_env, tmp_path)
    with sqlite3.connect(research) as dst:
        outcomes = [r[0] for r in dst.execute("SELECT outcome FROM pseudonymise_audit ORDER BY seq")]
        got = [r[0] for r in dst.execute("SELECT patient_id FROM patient_visits_pseudonymised")]
    assert outcomes == ["started", "success", "started", "success"]
    # no normaliser in the README's policy: the raw identifiers (` p100000 ` keeps its spaces)
    assert sorted(got, key=str) == sorted(token_pseudonyms(token, ids), key=str)
    print(f"provider, plugin and example DAG checked in {time.monotonic() - started:.1f} s")


def _readme_minimal_dag() -> str:
    """The Python block after "The minimal DAG" in the README."""
    readme = (ROOT / "README.md").read_text()
    after = readme[readme.index("**The minimal DAG and its connection.**"):]
    return after[after.index("```python\n") + len("```python\n"):after.index("\n```\n", after.index("```python"))] + "\n"


def _issue_token(cli: str, env: dict[str, str], work: Path) -> str:
    _run([cli, "issuer", "init", "--issuer-id", "wheel-test"], env, work)
    _run([cli, "project", "create", "research-a", "--method", "reversible", "--retention", "365d"], env, work)
    _run([cli, "token", "issue", "--project", "research-a", "--kind", "pseudonymisation", "--expires-in", "1d",
          "--output", str(work / "research-a.token")], env, work)
    (work / "issuer.jwks").write_text(_run([cli, "issuer", "public-key"], env, work))
    return (work / "research-a.token").read_text().strip()


def _installed_version(python: str, env: dict[str, str], cwd: Path) -> str:
    return _run([python, "-c", f"import importlib.metadata as m; print(m.version({PACKAGE!r}))"], env, cwd).strip()
