"""A scaling model from measured CPU costs: rows/s for N worker processes against one PostgreSQL server.

bench/run.py measures, for each case, the CPU seconds per row of the worker process, of the backend
that reads the source (COPY out) and of the backend that writes the target (COPY in, escrow, audit:
one transaction, so one backend), and the bytes per row in and out. From them, for N worker
processes (mapped key-range tasks, each on cores of its own) and a PostgreSQL server of C cores
holding source and target:

- one task is limited by its slowest serial stage: the worker's engine thread, the source backend or
  the target backend (they run at the same time, as a pipeline), so a task makes at most
  ``1 / max(worker, source, target)`` rows/s; N tasks at most N times that;
- the server's cores: every row costs ``source + target`` CPU seconds there, so at most
  ``C / (source + target)`` rows/s whatever N is;
- the network: every row crosses the server's network interface twice (out to a worker, back in),
  so at most ``bandwidth / (bytes in + bytes out)`` rows/s.

The prediction is the smallest of the three, and the model names which one it is. It leaves out
what the measurements cannot show on one machine: lock waits between tasks that write the same
escrow keys (they insert in key order, so they wait rather than deadlock), the write-ahead log's
disk, and the scheduler's start-up time per task (a second or two on Airflow).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

WORKERS = (1, 2, 4, 8, 16)
SERVER_CORES = (4, 16)
NETWORK_BYTES_PER_S = 10e9 / 8  # 10 Gbit/s between workers and the database


@dataclass(frozen=True)
class CaseCost:
    """One case's measured cost per row (seconds of CPU, bytes)."""

    name: str
    worker: float
    source: float
    target: float
    bytes_in: float
    bytes_out: float

    @classmethod
    def measured(cls, name: str, rows: int, worker_cpu: float, source_cpu: float, target_cpu: float,
                 bytes_in: float, bytes_out: float) -> CaseCost:
        if rows <= 0:
            raise ValueError("a case with no rows has no cost per row")
        return cls(name, worker_cpu / rows, source_cpu / rows, target_cpu / rows, bytes_in, bytes_out)

    def per_task(self) -> float:
        slowest = max(self.worker, self.source, self.target)
        return 1 / slowest if slowest > 0 else float("inf")

    def predict(self, workers: int, server_cores: int,
                network: float = NETWORK_BYTES_PER_S) -> tuple[float, str]:
        """Rows/s of ``workers`` tasks against a server of ``server_cores`` cores, and what limits it."""
        bounds = {
            "tasks": workers * self.per_task(),
            "server CPU": server_cores / (self.source + self.target) if self.source + self.target else float("inf"),
            "network": network / (self.bytes_in + self.bytes_out),
        }
        limit = min(bounds, key=bounds.__getitem__)
        return bounds[limit], limit

    def slowest_stage(self) -> str:
        stages = {"worker": self.worker, "source backend": self.source, "target backend": self.target}
        return max(stages, key=stages.__getitem__)


def table(costs: Iterable[CaseCost], workers: Iterable[int] = WORKERS,
          server_cores: Iterable[int] = SERVER_CORES) -> list[str]:
    """Markdown lines: the measured costs, then the predicted rows/s (and what saturates) per server size."""
    costs, workers, server_cores = list(costs), list(workers), list(server_cores)
    lines = ["| case | worker µs/row | source backend µs/row | target backend µs/row | bytes in / out per row "
             "| one task: slowest stage |",
             "|---|---:|---:|---:|---:|---|"]
    for c in costs:
        lines.append(f"| {c.name} | {c.worker * 1e6:.2f} | {c.source * 1e6:.2f} | {c.target * 1e6:.2f} "
                     f"| {c.bytes_in:.0f} / {c.bytes_out:.0f} | {c.slowest_stage()} |")
    for cores in server_cores:
        lines += ["", f"predicted rows/s, PostgreSQL on its own machine of {cores} cores, 10 Gbit/s network "
                  "(what saturates first in brackets):", "",
                  "| case | " + " | ".join(f"{n} worker{'s' if n > 1 else ''}" for n in workers) + " |",
                  "|---|" + "---:|" * len(workers)]
        for c in costs:
            cells = []
            for n in workers:
                rate, limit = c.predict(n, cores)
                cells.append(f"{rate:,.0f} ({limit})")
            lines.append(f"| {c.name} | " + " | ".join(cells) + " |")
    return lines


def costs_from_results(results: Mapping[str, Mapping[str, float]], names: Mapping[str, str]) -> list[CaseCost]:
    """:class:`CaseCost` of each case in ``names`` that has a measurement in ``results`` (keys: rows,
    worker_cpu, source_cpu, target_cpu, bytes_in, bytes_out)."""
    return [CaseCost.measured(names[case], int(r["rows"]), r["worker_cpu"], r["source_cpu"], r["target_cpu"],
                              r["bytes_in"], r["bytes_out"])
            for case, r in results.items() if case in names]
