"""Four eyes in a DAG, through the whole stack: the example reversal DAG waits in Airflow's
human-in-the-loop ``ApprovalOperator``; the reversal runs only when a user other than the one who
triggered the run approved it through the REST API, as the API server recorded both.

Plain processes (PostgreSQL, OpenBao with the token connections, API server, scheduler, DAG processor,
triggerer for the deferred approval task), users of the simple auth manager: ``alice`` asks (role
``op``), ``bob`` approves (``op``).
"""

from __future__ import annotations

import csv
import json
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog

from scripts.full_stack import DAG_ID, FullStack

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.vault, pytest.mark.slow]
REVERSAL = "pseudonymise_audit_reversal"
REASON = "subject access request SAR-2026-118"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullStack]:
    started = FullStack(tmp_path_factory.mktemp("stack") / "stack", parallelism=4, triggerer=True,
                        users={"alice": "op", "bob": "op"}).start()
    try:
        yield started
    finally:
        started.stop()


def _approval_path(run_id: str) -> str:
    return f"/api/v2/dags/{REVERSAL}/dagRuns/{run_id}/taskInstances/approve_reversal/-1/hitlDetails"


def _wait_for_approval_task(stack: FullStack, run_id: str, timeout: float = 240) -> dict[str, Any]:
    """Wait until the approval task waits for an answer: its HITL detail exists and the task instance has
    left the worker (an answer given while the worker still reports the task's pause races with it and
    fails the task: Airflow's own behaviour, so the test answers as a person would, once it waits)."""
    deadline = time.monotonic() + timeout
    ti_path = f"/api/v2/dags/{REVERSAL}/dagRuns/{run_id}/taskInstances/approve_reversal"
    while time.monotonic() < deadline:
        try:
            detail = stack.request("GET", _approval_path(run_id))
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        else:
            if stack.request("GET", ti_path)["state"] in ("deferred", "awaiting_input") and _pause_reported(stack, run_id):
                return detail
        time.sleep(1)
    raise RuntimeError(f"the approval task of {run_id} did not start waiting within {timeout} s")


def _pause_reported(stack: FullStack, run_id: str) -> bool:
    """Whether the scheduler has had the executor's report that the paused task's process ended (its log says
    so): an answer before that re-queues the task while the report is in flight, and the scheduler then
    fails it as "finished with state success, but the task instance's state attribute is queued"."""
    line = ("Received executor event with state success for task instance TaskInstanceKey(dag_id="
            f"'{REVERSAL}', task_id='approve_reversal', run_id='{run_id}'")
    return line in (stack.work / "scheduler.log").read_text(errors="replace")


def _ask(stack: FullStack, requests: Path, output: Path) -> str:
    run_id = stack.trigger(REVERSAL, None, {"requests_file": str(requests), "output_file": str(output),
                                            "reason": REASON}, user="alice")
    detail = _wait_for_approval_task(stack, run_id)
    assert detail["response_received"] is False and "Approve" in detail["options"]
    assert REASON in detail["body"] and "alice" in detail["body"]
    return run_id


def _approve(stack: FullStack, run_id: str, user: str) -> None:
    stack.request("PATCH", _approval_path(run_id), {"chosen_options": ["Approve"], "params_input": {}}, user=user)


def _reverse_uses(stack: FullStack) -> list[dict[str, Any]]:
    engine = sa.create_engine(stack.pg.url("research"))
    try:
        return [r for r in AuditLog(engine).iter_rows() if r["operation"] == "reverse" and r["event"] == "finished"]
    finally:
        engine.dispose()


def test_reversal_needs_the_approval_of_a_second_person(stack: FullStack, tmp_path: Path) -> None:
    stack.wait_for_dag(DAG_ID)
    load = stack.trigger(DAG_ID, "2026-11-06T00:00:00Z")
    assert stack.wait_for_run(DAG_ID, load)["state"] == "success"
    pseudonyms = sorted({r[0] for r in stack.research_rows("SELECT patient_id FROM patient_visits_pseudonymised")})
    requests = tmp_path / "requests.csv"
    requests.write_text("patient_id\n" + "\n".join(pseudonyms[:3]) + "\n")
    stack.wait_for_dag(REVERSAL)

    # alice asks and approves her own request: Airflow records the answer, the reversal refuses it
    output = tmp_path / "self-approved.csv"
    run_id = _ask(stack, requests, output)
    _approve(stack, run_id, "alice")
    run = stack.wait_for_run(REVERSAL, run_id)
    assert run["state"] == "failed" and run["triggering_user_name"] == "alice"
    assert not output.exists()
    refused = _reverse_uses(stack)[-1]
    assert (refused["outcome"], refused["error_class"], refused["triggered_by"]) == ("denied", "ApprovalError", "alice")
    assert refused["token_jti"] is None  # refused before the reverse token was read
    assert "own requester" in refused["error_message"]

    # alice asks, bob approves: the originals are written, the audit names both and the reason
    output = tmp_path / "revealed.csv"
    run_id = _ask(stack, requests, output)
    time.sleep(2)
    assert stack.request("GET", f"/api/v2/dags/{REVERSAL}/dagRuns/{run_id}")["state"] == "running"
    assert not output.exists()  # nothing before the approval
    _approve(stack, run_id, "bob")
    assert stack.wait_for_run(REVERSAL, run_id)["state"] == "success"
    revealed = [r["patient_id"] for r in csv.DictReader(output.open())]
    originals = {str(r[0]).strip().upper() for r in _hospital_ids(stack)}
    assert len(revealed) == 3 and set(revealed) <= originals
    done = _reverse_uses(stack)[-1]
    assert (done["outcome"], done["triggered_by"], done["token_kind"]) == ("success", "alice", "reverse")
    four_eyes = json.loads(done["details"])["four_eyes"]
    assert (four_eyes["requester"], four_eyes["approver"], four_eyes["reason"], four_eyes["via"]) == (
        "alice", "bob", REASON, "airflow-hitl")
    logs = "".join(p.read_text(errors="replace") for p in (stack.work / "airflow" / "logs").rglob("*.log"))
    assert stack.passwords["approvals-reader"] not in logs and not any(v in logs for v in revealed)


def _hospital_ids(stack: FullStack) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(stack.pg.url("hospital"))
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text("SELECT patient_id FROM patient_visits")))
    finally:
        engine.dispose()
