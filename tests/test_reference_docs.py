"""docs/reference/ is generated from the code (scripts/reference.py): it must say what the code says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import reference

ROOT = Path(__file__).resolve().parents[1]


def test_the_reference_is_up_to_date() -> None:
    proc = subprocess.run([sys.executable, "scripts/reference.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_a_stale_page_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "reference"
    shutil.copytree(ROOT / "docs" / "reference", copy)
    (copy / "operators.md").write_text((copy / "operators.md").read_text().replace("ReversePseudonymsOperator", "X"))
    monkeypatch.setattr(reference, "OUT", copy)
    assert reference.main(["--check"]) == 1
    assert "operators.md" in capsys.readouterr().out


def test_every_operator_hook_command_and_route_is_documented() -> None:
    pages = {p.name: p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md")}
    for name in ("PseudonymiseOperator", "ReversePseudonymsOperator", "SubjectErasureOperator",
                 "SourceRetireOperator", "AuditCheckpointOperator"):
        assert f"## `{name}`" in pages["operators.md"]
    assert "## `AirflowApprovalHook`" in pages["hooks.md"] and "## `PseudonymisationTokenHook`" in pages["hooks.md"]
    for command in ("pseudonymise token issue", "pseudonymise file pseudonymise", "pseudonymise audit verify"):
        assert f"## `{command}`" in pages["cli.md"]
    assert "reverse-requests/{request_id}/approve" in pages["http-api.md"]
    assert "`reverse_request_ttl_minutes`" in pages["configuration.md"]
