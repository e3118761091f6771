"""Every example the ``pseudonymise`` command's help prints runs as printed, on the shipped files (issue 16).

The examples are read from the parser (the top-level walkthrough, each group's and each command's epilog)
and run by ``bash`` in a working folder that holds a copy of ``include/`` (the shipped sample and policy),
with ``pseudonymise`` on ``PATH`` and ``HOME`` pointing there (the default issuer store is
``~/.pseudonymise``). The walkthrough and the first ``issuer`` example start from nothing; every other
example starts from a copy of a world made by the CLI: an issuer, the projects research-a (reversible) and
vendor-x, their tokens, the sample pseudonymised, the issuer's public keys and an audit signing key.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pseudonymise.cli import build_parser

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: the examples that start from nothing (they create the issuer)
FROM_NOTHING = {"pseudonymise", "pseudonymise issuer"}


def help_examples() -> list[tuple[str, str]]:
    """``(command, example)`` for every parser: the epilog's text after its ``example…:`` line, dedented."""
    found: list[tuple[str, str]] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        header, _, body = (parser.epilog or "").partition(":\n")
        assert header.startswith("example"), f"{path} --help has no example"
        found.append((path, "\n".join(line.removeprefix("  ") for line in body.splitlines())))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")

    walk(build_parser(), "pseudonymise")
    return found


def run(script: str, cwd: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PSEUDONYMISE_", "VAULT_"))}
    env.update(HOME=str(cwd), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=300)


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``pseudonymise`` command on PATH: this tree's CLI in this interpreter."""
    folder = tmp_path_factory.mktemp("bin")
    command = folder / "pseudonymise"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pseudonymise.cli "$@"\n', encoding="utf-8")
    command.chmod(0o755)
    return folder


def nothing(folder: Path) -> Path:
    folder.mkdir()
    shutil.copytree(REPO / "include", folder / "include")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, bin_dir: Path) -> Path:
    folder = nothing(tmp_path_factory.mktemp("world") / "w")
    made = run("""
        pseudonymise issuer init --issuer-id my-org
        pseudonymise project create research-a --method reversible --retention 1y
        pseudonymise project create vendor-x --alphabet hex --length 32 --prefix V-
        pseudonymise token issue --project research-a --kind pseudonymisation --output research-a.token
        pseudonymise token issue --project research-a --kind reverse --output reverse.token
        pseudonymise token issue --project vendor-x --kind secondary --source-project research-a --output vendor.token
        pseudonymise issuer public-key --output issuer-keys.json
        pseudonymise file pseudonymise include/sample/patients.csv patients.pseudonymised.csv \
            --policy include/policies/patients.json --token-file research-a.token
        pseudonymise audit keygen --output audit-signing.jwk > audit-public.jwks
        """, folder, bin_dir)
    assert made.returncode == 0, made.stderr
    with (folder / "include/sample/patients.csv").open(encoding="utf-8", newline="") as fh:
        (folder / "ids.txt").write_text(list(csv.DictReader(fh))[1]["patient_id"] + "\n", encoding="utf-8")
    with (folder / "patients.pseudonymised.csv").open(encoding="utf-8", newline="") as fh:
        (folder / "pseudonyms.txt").write_text(list(csv.DictReader(fh))[2]["patient_id"] + "\n", encoding="utf-8")
    return folder


def test_every_command_has_an_example() -> None:
    commands = [command for command, _ in help_examples()]
    assert len(commands) == 1 + 8 + 19 and len(set(commands)) == len(commands)
    assert all(example.startswith("pseudonymise ") for _, example in help_examples())


@pytest.mark.parametrize(("command", "example"), help_examples(), ids=[c for c, _ in help_examples()])
def test_help_example_runs(command: str, example: str, world: Path, bin_dir: Path, tmp_path: Path) -> None:
    if command in FROM_NOTHING:
        folder = nothing(tmp_path / "fresh")
    else:
        folder = tmp_path / "copy"
        shutil.copytree(world, folder, symlinks=True)
    proc = run(example, folder, bin_dir)
    assert proc.returncode == 0, f"`{command} --help`'s example failed:\n{example}\n{proc.stderr[-2000:]}"
    assert "error" not in proc.stderr.lower() and "warning" not in proc.stderr.lower(), proc.stderr
