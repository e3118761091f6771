"""A fault, then a retry: the retry of a DAG run that failed on a fault must give a good run's rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.airflow.conftest import DagRun, audit_rows, pg_conn, rows


def fault_then_retry(world: dict[str, Any], connections: dict[str, Any], fault: Callable[[], Any],
                     repair: Callable[[], Any], *, message: str, outcome: str, secrets: list[str],
                     error_class: str = "TokenUnavailableError", retryable: bool = False,
                     dag_id: str = "pseudonymise_test", spec: Any = None, dags_folder: Path | None = None,
                     table: str = "visits", order: str = "visit_id") -> None:
    """The DAG run of 4 November without the fault, into another database (the rows a good run gives);
    then with the fault: it must fail saying ``message``, write nothing, and leave its use audited
    with ``outcome`` (``denied``, ``failed``) and ``error_class``, the task failing for good or, when
    ``retryable`` (a service could not be reached), so that Airflow's ``retries`` apply; then, the fault repaired,
    the same run again (a retry), which must leave in the target exactly the good run's rows and a
    ``success``. No string of ``secrets`` may appear in the runs' output."""
    airflow, research, vendor = world["airflow"], world["urls"]["research"], world["urls"]["vendor"]

    def run(conns: dict[str, Any]) -> DagRun:
        return airflow.dags_test(dag_id, "2026-11-04", conns, spec=spec, dags_folder=dags_folder)

    reference = run({**connections, "research_db": pg_conn(vendor)})
    assert reference.returncode == 0, reference.output[-3000:]
    expected = rows(vendor, table, order)
    assert len(expected) == 24
    fault()
    failed = run(connections)
    assert failed.returncode != 0
    assert not sa.inspect(sa.create_engine(research)).has_table(table)
    repair()
    retry = run(connections)
    assert retry.returncode == 0, retry.output[-3000:]
    assert rows(research, table, order) == expected
    assert message in failed.output
    audit = audit_rows(research)
    assert [a["outcome"] for a in audit] == ["started", outcome, "started", "success"]
    assert audit[1]["error_class"] == error_class
    assert ("(retryable)" in failed.output) is retryable
    for secret in secrets:
        assert secret not in failed.output + retry.output
