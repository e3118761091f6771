"""The whole stack from plain processes: PostgreSQL, OpenBao, Airflow API server, scheduler and DAG
processor (LocalExecutor); the token connection comes from Vault through the VaultBackend.

A run is triggered through the REST API as a real client would, then `airflow backfill create`
covers three days twice; target rows, audit rows and the logs are checked in PostgreSQL and on disk.
The loads trigger the vendor share DAG through the research table's asset alias (checked against the
standard library). Then two overlapping backfills and REST-triggered runs of the same intervals run at once, held
together inside their transactions, and leave exactly one copy of each interval. Last, four eyes: the
example reversal DAG waits in Airflow's human-in-the-loop ``ApprovalOperator`` (the triggerer runs for
it) and reverses only when a user other than the one who triggered the run approved it through the REST
API, as the API server recorded both; users of the simple auth manager: ``alice`` asks, ``bob`` approves
(both role ``op``). One stack serves every test of the module: starting one takes most of a minute.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import time
import urllib.error
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog

from scripts.full_stack import DAG_ID, FullStack
from tests.airflow.conftest import expected_pseudonyms
from tests.reference import token_pseudonyms

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.vault, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullStack]:
    """One stack for the module: starting it takes most of a minute."""
    started = FullStack(tmp_path_factory.mktemp("stack") / "stack", triggerer=True,
                        users={"alice": "op", "bob": "op"}).start()
    try:
        yield started
    finally:
        started.stop()


def test_full_stack_rest_trigger_and_backfill_twice(stack: FullStack) -> None:
    t0 = time.monotonic()
    stack.wait_for_dag(DAG_ID)
    stack.wait_for_dag(VENDOR)  # unpaused: scheduled on the research table's asset alias
    # the scheduler's own run of the latest interval first: it attaches the target's new asset, and Airflow
    # 3.3 fails one of two tasks that create the same new asset at one instant (docs/dags.md, "Assets")
    stack.wait_for_runs(DAG_ID, 1)
    stack.trigger(DAG_ID, "2026-11-06T00:00:00Z")
    stack.wait_for_runs(DAG_ID, 2)
    snapshots = []
    for reprocess in ("none", "completed"):
        stack.backfill(DAG_ID, "2026-11-03", "2026-11-05", reprocess)
        stack.wait_for_runs(DAG_ID, 4)
        snapshots.append(stack.research_rows(
            "SELECT * FROM patient_visits_pseudonymised ORDER BY visit_date, patient_id, birth_year"))
    runs = stack.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?limit=100")["dag_runs"]
    assert {r["state"] for r in runs} == {"success"}, runs
    assert {r["run_type"] for r in runs} >= {"manual", "backfill"}
    assert snapshots[0] == snapshots[1]
    per_day = dict(stack.research_rows(
        "SELECT visit_date::text, count(*) FROM patient_visits_pseudonymised GROUP BY 1"))
    assert {d: per_day[d] for d in ("2026-11-03", "2026-11-04", "2026-11-05")} == \
        {"2026-11-03": 24, "2026-11-04": 24, "2026-11-05": 24}

    engine = sa.create_engine(stack.pg.url("research"))
    audit = AuditLog(engine)
    assert audit.verify().ok
    rows = [r for r in audit.iter_rows() if r["dag_id"] == DAG_ID]
    finished = [r for r in rows if r["event"] == "finished"]
    # one use per task run: 1 REST-triggered, the scheduler's own latest interval, 3 + 3 backfill
    # (the reprocessing backfill reuses the run ids with a new try number)
    task_runs = {(r["run_id"], r["try_number"]) for r in rows}
    assert len(finished) == len({r["use_id"] for r in rows}) == len(task_runs) == 8
    assert {r["outcome"] for r in finished} == {"success"}
    assert {r["token_kind"] for r in finished} == {"pseudonymisation"}
    engine.dispose()

    # 8 mapped tasks over key ranges, running at once (parallelism 8) on one target and one audit
    mapped_dag = "pseudonymise_visits_by_key_range"
    stack.wait_for_dag(mapped_dag)
    run_id = stack.request("POST", f"/api/v2/dags/{mapped_dag}/dagRuns", {"logical_date": None})["dag_run_id"]
    runs = stack.wait_for_runs(mapped_dag, 1)
    assert {r["state"] for r in runs} == {"success"}, runs
    tis = stack.request("GET", f"/api/v2/dags/{mapped_dag}/dagRuns/{run_id}/taskInstances?limit=100")
    mapped = [t for t in tis["task_instances"] if t["task_id"] == "pseudonymise_range"]
    assert sorted(t["map_index"] for t in mapped) == list(range(8)) and {t["state"] for t in mapped} == {"success"}
    assert stack.research_rows("SELECT count(*), count(DISTINCT visit_id) FROM patient_visits_all_pseudonymised") \
        == [(240, 240)]
    engine = sa.create_engine(stack.pg.url("research"))
    audit = AuditLog(engine)
    assert audit.verify().ok
    mapped_uses = [r for r in audit.iter_rows() if r["dag_id"] == mapped_dag and r["event"] == "finished"]
    assert sorted(r["map_index"] for r in mapped_uses) == list(range(8))
    assert {r["outcome"] for r in mapped_uses} == {"success"}
    engine.dispose()

    _vendor_share_follows_the_loads(stack)

    logs = "\n".join(p.read_text(errors="replace") for p in (stack.work / "airflow").rglob("*.log"))
    logs += "\n".join(p.read_text(errors="replace") for p in stack.work.glob("*.log"))
    assert "pseudonymise: 24 rows in" in logs
    assert stack.vendor_token not in logs
    assert stack.token not in logs
    print(f"\nfull-stack test wall time: {time.monotonic() - t0:.0f} s")


VENDOR = "pseudonymise_vendor_share"


def _vendor_share_follows_the_loads(stack: FullStack, timeout: float = 300) -> None:
    """The vendor share DAG is scheduled on the research table's asset alias: the loads' events trigger it
    (run type ``asset_triggered``; the event's asset is the table's OpenLineage-style URI, attached by the
    load through the alias), and its last run re-pseudonymised the whole research table with the vendor's
    secondary token, as the standard library computes it."""
    deadline = time.monotonic() + timeout
    while True:
        runs = stack.request("GET", f"/api/v2/dags/{VENDOR}/dagRuns?limit=100")["dag_runs"]
        research = [r[0] for r in stack.research_rows("SELECT patient_id FROM patient_visits_pseudonymised")]
        present = stack.research_rows("SELECT to_regclass('vendor_patient_visits') IS NOT NULL", "vendor")[0][0]
        vendor = [r[0] for r in stack.research_rows("SELECT patient_id FROM vendor_patient_visits", "vendor")] \
            if present else []
        if runs and all(r["state"] in ("success", "failed") for r in runs) and len(vendor) == len(research):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"vendor share: {len(vendor)} rows for {len(research)} research rows; runs: "
                                 f"{[(r['dag_run_id'], r['state']) for r in runs]}")
        time.sleep(2)
    assert {(r["run_type"], r["state"]) for r in runs} == {("asset_triggered", "success")}, runs
    events = stack.request("GET", f"/api/v2/dags/{VENDOR}/dagRuns/{runs[0]['dag_run_id']}/upstreamAssetEvents")
    assert events["asset_events"] and all(
        e["uri"].startswith("postgres://127.0.0.1:") and e["uri"].endswith("/research/public/patient_visits_pseudonymised")
        and e["source_dag_id"] == DAG_ID for e in events["asset_events"]), events
    assert sorted(vendor) == sorted(token_pseudonyms(stack.vendor_token, research))
    assert not set(vendor) & set(research)


# --- overlapping backfills ------------------------------------------------------------------------
TARGET = "patient_visits_pseudonymised"
GATE_KEY = 0x50530001  # the gate's advisory lock (classid 0, objid GATE_KEY); the plugin's keys are hashes


class Gate:
    """Holds every write to the target inside its transaction until the test opens it.

    A statement trigger on the target takes a shared advisory lock that the test holds exclusively:
    a writer stops right after its COPY into the target, that is after the write mode's lock and
    DELETE and before escrow, the audit ``finished`` row and COMMIT, with its transaction open.
    """

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        self.conn = self.engine.connect()
        self.conn.execute(sa.text(
            "CREATE OR REPLACE FUNCTION stack_test_gate() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_advisory_xact_lock_shared({GATE_KEY}); RETURN NULL; END $$"))
        self.conn.execute(sa.text(f"CREATE TRIGGER stack_test_gate AFTER INSERT ON {TARGET}"
                                  " FOR EACH STATEMENT EXECUTE FUNCTION stack_test_gate()"))

    def close(self) -> None:
        self.conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": GATE_KEY})

    def open(self) -> None:
        self.conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": GATE_KEY})

    def waiting(self) -> dict[str, int]:
        """Backends of the target's database waiting on a lock: at the gate, on the write mode's interval
        lock (an insert into its lock table, waiting for the transaction holding an overlapping
        interval), or on something else (named by its lock type)."""
        rows = self.conn.execute(sa.text(
            "SELECT CASE WHEN l.locktype = 'advisory' AND l.classid = 0 AND l.objid = :k THEN 'gate'"
            " WHEN l.locktype = 'transactionid' AND a.query LIKE '%pseudonymise_write_lock%' THEN 'write lock'"
            " ELSE l.locktype END, count(*)"
            " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE NOT l.granted AND a.datname = current_database() GROUP BY 1"), {"k": GATE_KEY})
        return dict(rows.all())

    def wait_for(self, expected: dict[str, int], describe: Callable[[], Any], timeout: float = 180) -> None:
        """Wait until the waiting backends are ``expected`` on two polls in a row."""
        deadline, seen, last = time.monotonic() + timeout, 0, {}
        while time.monotonic() < deadline:
            last = self.waiting()
            seen = seen + 1 if last == expected else 0
            if seen == 2:
                return
            time.sleep(0.5)
        raise AssertionError(f"waiting on locks: {last}, expected {expected}; runs: {describe()}")

    def remove(self) -> None:
        self.open()
        self.conn.execute(sa.text(f"DROP TRIGGER IF EXISTS stack_test_gate ON {TARGET}"))
        self.conn.close()
        self.engine.dispose()


def _refusal(call: Callable[[], Any]) -> tuple[int, str]:
    try:
        call()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    raise AssertionError("the call was accepted")


def _interval_rows(stack: FullStack, days: list[str]) -> list[tuple[Any, ...]]:
    return stack.research_rows(
        f"SELECT * FROM {TARGET} WHERE visit_date::text IN ({', '.join(repr(d) for d in days)})"
        " ORDER BY visit_date, patient_id, birth_year, ward, diagnosis_code")


def test_overlapping_backfills_and_rest_runs_of_one_interval_leave_one_copy(stack: FullStack) -> None:
    """Airflow 3.3 keeps one backfill per DAG running and one run per logical date, but runs of the
    same data interval still overlap: a REST-triggered run whose logical date lies inside a backfill's
    interval, and a reprocessing backfill that takes such a manual run over. Every writer here is
    held open at the gate until all of them have started; the second writer of an interval must then
    be found waiting on the write mode's lock, not at the gate. Without that lock it would DELETE
    (seeing none of the first writer's uncommitted rows), write its own copy and reach the gate too:
    the waits below would not match and the interval would end up in the target twice (checked once
    by running this test with the plugin's partition lock patched out: 5 at the gate, 48 rows a day).
    """
    t0 = time.monotonic()
    stack.wait_for_dag(DAG_ID)
    if not sa.inspect(sa.create_engine(stack.pg.url("research"))).has_table(TARGET):
        stack.wait_for_runs(DAG_ID, 1)  # the scheduler's own run first (see the first test)
        stack.trigger(DAG_ID, "2026-11-02T00:00:00Z")  # this test alone: a first run creates the target
        stack.wait_for_runs(DAG_ID, 1)
    days = ["2026-11-07", "2026-11-08", "2026-11-09"]

    def runs() -> list[dict[str, Any]]:
        return stack.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?limit=100")["dag_runs"]

    def describe() -> list[tuple[str, str, str, str]]:
        return [(r["dag_run_id"], r["data_interval_start"][:10], r["run_type"], r["state"]) for r in runs()]

    def trigger(logical_date: str, **interval: str) -> dict[str, Any]:
        return stack.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": logical_date, **interval})

    gate = Gate(stack.pg.url("research"))
    try:
        # 1. backfill A over 7-9 November, and while it runs, everything that overlaps it
        gate.close()
        stack.backfill(DAG_ID, days[0], days[-1], "none", wait=False)
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(stack.airflow, "backfill", "create", "--dag-id", DAG_ID, "--from-date", days[1],
                                 "--to-date", "2026-11-10", "--reprocess-behavior", "completed")
            rest_backfill = _refusal(lambda: stack.request("POST", "/api/v2/backfills", {
                "dag_id": DAG_ID, "from_date": f"{days[1]}T00:00:00Z", "to_date": "2026-11-10T00:00:00Z",
                "reprocess_behavior": "completed"}))
            same_logical_date = _refusal(lambda: trigger(f"{days[1]}T00:00:00Z"))
            # a manual run at noon on the 8th covers the day before: [7th, 8th), as backfill A's first run
            noon = trigger("2026-11-08T12:00:00Z")
            # logical date 10th is free (A ends on the 9th) and covers [9th, 10th), as A's last run
            tenth = trigger("2026-11-10T00:00:00Z")
            # A's three runs and the two REST runs are all writing: one writer per interval at the gate,
            # the second writer of the 7th and of the 9th waiting on the write mode's lock
            gate.wait_for({"gate": 3, "write lock": 2}, describe)
            refused = second.result()
        assert refused.returncode != 0
        assert "There can be only one running backfill per Dag" in refused.stdout + refused.stderr
        assert rest_backfill[0] == 409 and "already a running backfill" in rest_backfill[1]
        assert same_logical_date[0] == 409 and "Unique constraint violation" in same_logical_date[1]
        assert (noon["data_interval_start"][:10], noon["data_interval_end"][:10]) == (days[0], days[1])
        assert (tenth["data_interval_start"][:10], tenth["data_interval_end"][:10]) == (days[2], "2026-11-10")
        gate.open()
        stack.wait_for_runs(DAG_ID, len(runs()))
        first_pass = _interval_rows(stack, days)

        # 2. backfill B over 8-10 November once A has completed, reprocessing what already ran: it
        # clears A's runs of the 8th and 9th and takes over the REST run of logical date 10th, whose
        # interval is the 9th, so B itself runs the 9th twice at once; a REST run of the 8th joins
        gate.close()
        stack.wait_for_backfills(DAG_ID)
        stack.backfill(DAG_ID, days[1], "2026-11-10", "completed", wait=False)
        trigger("2026-11-08T18:00:00Z", data_interval_start=f"{days[1]}T00:00:00Z",
                data_interval_end=f"{days[2]}T00:00:00Z")
        gate.wait_for({"gate": 2, "write lock": 2}, describe)
        taken_over = next(r for r in runs() if r["dag_run_id"] == tenth["dag_run_id"])
        assert (taken_over["run_type"], taken_over["state"]) == ("backfill", "running"), taken_over
        gate.open()
        final = stack.wait_for_runs(DAG_ID, len(runs()))
    finally:
        gate.remove()

    assert {r["state"] for r in final} == {"success"}, describe()
    # exactly one copy of each interval: the source's rows, pseudonymised, once
    hospital = sa.create_engine(stack.pg.url("hospital"))
    with hospital.connect() as conn:
        source = {str(d): (n, k) for d, n, k in conn.execute(sa.text(
            "SELECT visit_date, count(*), count(DISTINCT upper(trim(patient_id))) FROM patient_visits"
            " GROUP BY 1"))}
    hospital.dispose()
    target = {d: (n, k) for d, n, k in stack.research_rows(
        f"SELECT visit_date::text, count(*), count(DISTINCT patient_id) FROM {TARGET} GROUP BY 1")}
    assert {d: target.get(d) for d in days} == {d: source[d] for d in days} == {d: (24, 24) for d in days}
    for day in days:
        end = (dt.date.fromisoformat(day) + dt.timedelta(days=1)).isoformat()
        assert sorted(p for p, d in stack.research_rows(f"SELECT patient_id, visit_date::text FROM {TARGET}")
                      if d == day) == expected_pseudonyms(stack.token, stack.pg.url("hospital"), day, end)
    # no run covered [10th, 11th): the run holding logical date 10th covers the 9th
    assert "2026-11-10" not in target
    assert _interval_rows(stack, days) == first_pass

    # the audit: one successful use per task run of each interval (7th: A and a REST run; 8th: A, B
    # and a REST run; 9th: A, the REST run, and B twice), each started and finished; the chain holds
    engine = sa.create_engine(stack.pg.url("research"))
    audit = AuditLog(engine)
    assert audit.verify().ok
    rows = [r for r in audit.iter_rows() if (r["data_interval_start"] or "")[:10] in days]
    engine.dispose()
    finished = [r for r in rows if r["event"] == "finished"]
    assert Counter(r["data_interval_start"][:10] for r in finished) == {days[0]: 2, days[1]: 3, days[2]: 4}
    assert {r["outcome"] for r in finished} == {"success"}
    assert Counter(r["use_id"] for r in rows) == {r["use_id"]: 2 for r in finished}

    logs = "\n".join(p.read_text(errors="replace") for p in (stack.work / "airflow").rglob("*.log"))
    assert stack.token not in logs
    print(f"\noverlapping backfills test wall time: {time.monotonic() - t0:.0f} s")


# --- four eyes ------------------------------------------------------------------------------------
REVERSAL = "pseudonymise_audit_reversal"
REASON = "subject access request SAR-2026-118"


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
    # the approver is shown the digest of the very pseudonyms the reversal will read (the digest task's line)
    pseudonyms = sorted({r["patient_id"] for r in csv.DictReader(requests.open())})
    assert f"pseudonym set digest: {_set_digest(pseudonyms)} ({len(pseudonyms)} pseudonyms in patient_id)" in detail["body"]
    return run_id


def _set_digest(pseudonyms: list[str]) -> str:
    """A pseudonym set's digest written out again: SHA-256 of its sorted (column, pseudonym) pairs as compact JSON."""
    pairs = sorted(["patient_id", p] for p in set(pseudonyms))
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()


def _reveal_task_ended(stack: FullStack, run_id: str, timeout: float = 240) -> str:
    """The state the reveal task ends in after it was cleared (it goes back to the queue first)."""
    path = f"/api/v2/dags/{REVERSAL}/dagRuns/{run_id}/taskInstances/reveal_pseudonyms"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ti = stack.request("GET", path)
        if ti["try_number"] > 1 and ti["state"] in ("success", "failed"):
            return str(ti["state"])
        time.sleep(1)
    raise RuntimeError(f"the cleared reveal task of {run_id} did not end within {timeout} s")


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
    if not stack.research_rows(f"SELECT 1 FROM information_schema.tables WHERE table_name = '{TARGET}'"):
        stack.wait_for_runs(DAG_ID, 1)  # the scheduler's own run first (see the first test)
        load = stack.trigger(DAG_ID, "2026-11-02T00:00:00Z")  # this test alone: a first run loads the target
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
    assert four_eyes["pseudonym_set_digest"] == _set_digest(pseudonyms[:3])

    # the reveal task cleared and run again: one approval reveals once
    output.unlink()
    stack.request("POST", f"/api/v2/dags/{REVERSAL}/clearTaskInstances",
                  {"dry_run": False, "dag_run_id": run_id, "task_ids": ["reveal_pseudonyms"], "only_failed": False,
                   "reset_dag_runs": True})
    assert _reveal_task_ended(stack, run_id) == "failed"
    assert not output.exists()
    again = _reverse_uses(stack)[-1]
    assert (again["outcome"], again["error_class"], again["token_jti"]) == ("denied", "ApprovalError", None)
    assert f"used already, by reversal use {done['use_id']}" in again["error_message"]

    # alice asks, and swaps the file's pseudonyms for others once the approval waits: bob approves what he was
    # shown, and nothing else is revealed
    output = tmp_path / "swapped.csv"
    run_id = _ask(stack, requests, output)
    requests.write_text("patient_id\n" + "\n".join(pseudonyms[3:6]) + "\n")
    _approve(stack, run_id, "bob")
    assert stack.wait_for_run(REVERSAL, run_id)["state"] == "failed"
    assert not output.exists()
    swapped = _reverse_uses(stack)[-1]  # refused before the (single-use) reverse token is read: none of its uses
    assert (swapped["outcome"], swapped["error_class"], swapped["token_jti"]) == ("denied", "ApprovalError", None)
    assert "not the set that was approved" in swapped["error_message"]

    logs = "".join(p.read_text(errors="replace") for p in (stack.work / "airflow" / "logs").rglob("*.log"))
    assert stack.passwords["approvals-reader"] not in logs and not any(v in logs for v in revealed)


def _hospital_ids(stack: FullStack) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(stack.pg.url("hospital"))
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text("SELECT patient_id FROM patient_visits")))
    finally:
        engine.dispose()
