"""Re-identification risk: k-anonymity and l-diversity over quasi-identifiers, exactly and in bounded memory.

An *equivalence class* is the set of rows that share one combination of quasi-identifier values; a row
is k-anonymous when its class holds at least ``k`` rows, and a class is l-diverse when it holds at least
``l`` distinct values of a sensitive column (NULL is not a value). Every figure is a count: no class's
values ever leave this module (a class's quasi-identifier values are data).

Counting is done by a database's ``GROUP BY``, never by a Python dict of all rows:

- :class:`PostgresRiskTap`: a run into a PostgreSQL table groups, in its own transaction before the commit,
  the target itself when the run replaces it, else a copy of its output rows in a temporary table
  (``ON COMMIT DROP``);
- :class:`SpillRiskTap`: anywhere else (files, SQLite, other databases, dry runs), counts per class are
  kept in memory up to ``memory_groups`` entries and then spilled into an SQLite file on disk, where the
  same ``GROUP BY`` runs at the end;
- :func:`describe_table` and :func:`describe_batches` (the risk report) run the same queries over an
  existing table, or over a file's rows spilled the same way, once per combination of quasi-identifiers.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import sqlite3
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pseudonymise.core.copytext import CopyBlock, CopyText, build_rows, decode_column, encode_column, split_rows
from pseudonymise.core.defaults import MAX_REPORT_QIS, MEMORY_GROUPS
from pseudonymise.core.errors import PolicyError, RiskGateError


# --- what to check ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RiskSpec:
    """The gate: ``quasi_identifiers`` whose combination must be shared by at least ``k`` rows and, when
    ``l_column`` is given, show at least ``l_min`` distinct values of that sensitive column per class."""

    quasi_identifiers: tuple[str, ...]
    k: int = 5
    l_column: str | None = None
    l_min: int | None = None

    def __post_init__(self) -> None:
        qis = self.quasi_identifiers
        if not qis or not all(isinstance(q, str) and q for q in qis):
            raise PolicyError('risk: "quasi_identifiers" must be a non-empty list of column names')
        if len(set(qis)) != len(qis):
            raise PolicyError(f"risk: quasi_identifiers name a column twice ({', '.join(map(repr, qis))})")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise PolicyError(f"risk: k must be an integer of at least 2 (k=1 gates nothing), not {self.k!r}")
        if self.l_column is not None:
            if not isinstance(self.l_column, str) or not self.l_column:
                raise PolicyError('risk: "l" needs "column", the sensitive column whose values each class must vary in')
            if self.l_column in qis:
                raise PolicyError(f"risk: the sensitive column {self.l_column!r} is also a quasi-identifier; "
                                  "a column is one or the other")
            if isinstance(self.l_min, bool) or not isinstance(self.l_min, int) or self.l_min < 2:
                raise PolicyError(f"risk: l min must be an integer of at least 2, not {self.l_min!r}")

    @classmethod
    def parse(cls, data: Any) -> RiskSpec | None:
        """From ``{"quasi_identifiers": [...], "k": 5, "l": {"column": "diagnosis", "min": 2}}`` (``l`` optional;
        ``"l": 2`` with ``"sensitive": "diagnosis"`` too); ``None`` and ``{}`` mean no gate."""
        if data is None or isinstance(data, RiskSpec):
            return data
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise PolicyError(f"risk: not valid JSON ({exc.msg} at character {exc.pos})") from None
        if not isinstance(data, Mapping):
            raise PolicyError(f"risk must be an object like {{\"quasi_identifiers\": [...], \"k\": 5}}, not "
                              f"{type(data).__name__}")
        if not data:
            return None
        unknown = sorted(set(data) - {"quasi_identifiers", "k", "l", "sensitive"})
        if unknown:
            raise PolicyError(f"risk: unknown field(s) {unknown}; use quasi_identifiers, k, l")
        qis = data.get("quasi_identifiers")
        if isinstance(qis, str):
            qis = [q.strip() for q in qis.split(",") if q.strip()]
        if not isinstance(qis, (list, tuple)):
            raise PolicyError('risk: "quasi_identifiers" must be a non-empty list of column names')
        l_spec, l_column, l_min = data.get("l"), data.get("sensitive"), None
        if isinstance(l_spec, Mapping):
            extra = sorted(set(l_spec) - {"column", "min"})
            if extra:
                raise PolicyError(f"risk: unknown field(s) {extra} in l; use column, min")
            l_column, l_min = l_spec.get("column", l_column), l_spec.get("min", 2)
        elif l_spec is not None:
            l_min = l_spec
            if l_column is None:
                raise PolicyError('risk: "l" as a number needs "sensitive", the column it applies to')
        elif l_column is not None:
            l_min = 2
        return cls(tuple(qis), data.get("k", 5), l_column, l_min)

    @property
    def columns(self) -> list[str]:
        """The columns the gate reads: the quasi-identifiers, then the sensitive column."""
        return [*self.quasi_identifiers, *([self.l_column] if self.l_column else [])]

    def check(self, source_columns: Sequence[str], output_columns: Sequence[str]) -> None:
        """Refuse a gate that names a column the source lacks, or one the policy drops (the gate reads the output)."""
        for column in self.columns:
            if column not in source_columns and column not in output_columns:
                raise PolicyError(f"risk: column {column!r} is not in the source (it has "
                                  f"{', '.join(map(repr, source_columns))}); fix the risk settings")
            if column not in output_columns:
                raise PolicyError(f"risk: column {column!r} is dropped by the column policy, but the gate counts the "
                                  "output's rows; keep it (or transform it) in the policy, or take it out of the gate")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quasi_identifiers": list(self.quasi_identifiers), "k": self.k}
        if self.l_column:
            out["l"] = {"column": self.l_column, "min": self.l_min}
        return out


@dataclass(frozen=True)
class RiskFigures:
    """What the gate found: counts only."""

    spec: RiskSpec
    rows: int
    classes: int
    smallest_class: int | None
    classes_below_k: int
    rows_below_k: int
    l_smallest: int | None = None
    classes_below_l: int = 0
    rows_below_l: int = 0
    spilled: int = 0

    @property
    def passed(self) -> bool:
        return self.classes_below_k == 0 and self.classes_below_l == 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.spec.as_dict(), "rows": self.rows, "classes": self.classes,
                               "smallest_class": self.smallest_class, "classes_below_k": self.classes_below_k,
                               "rows_below_k": self.rows_below_k, "passed": self.passed,
                               **({"spills": self.spilled} if self.spilled else {})}
        if self.spec.l_column:
            out.update(l_smallest=self.l_smallest, classes_below_l=self.classes_below_l,
                       rows_below_l=self.rows_below_l)
        return out

    def failure(self) -> str:
        """Why the gate fails, with the figures (never a value)."""
        qis = ", ".join(self.spec.quasi_identifiers)
        parts = []
        if self.classes_below_k:
            parts.append(f"{self.classes_below_k} of {self.classes} classes over ({qis}) have fewer than "
                         f"k={self.spec.k} rows ({self.rows_below_k} of {self.rows} rows; smallest class "
                         f"{self.smallest_class})")
        if self.classes_below_l:
            parts.append(f"{self.classes_below_l} classes ({self.rows_below_l} rows) have fewer than "
                         f"l={self.spec.l_min} distinct values of {self.spec.l_column!r} (fewest {self.l_smallest})")
        return "; ".join(parts)


def gate(figures: RiskFigures, what: str = "nothing was committed") -> None:
    """Raise :class:`RiskGateError` when ``figures`` fall short."""
    if not figures.passed:
        raise RiskGateError(
            f"re-identification risk gate failed: {figures.failure()}; {what}. Generalise or suppress the "
            "quasi-identifiers further (or lower k only with your data protection officer's agreement)"
        )


# --- the GROUP BY queries -----------------------------------------------------------------------
def _classes(source: str, qis: Sequence[str], sensitive: str | None, *, weighted: bool) -> str:
    """One row per class: its size ``n`` and, with ``sensitive``, its distinct sensitive values ``d``.

    ``weighted``: the source is a spill table of encoded values with a count ``n`` per (class, value)."""
    if weighted:
        d = ", count(DISTINCT CASE WHEN s <> 'null' THEN s END) AS d" if sensitive else ""
        return f"SELECT sum(n) AS n{d} FROM {source} GROUP BY {', '.join(qis)}"
    d = f", count(DISTINCT {sensitive}) AS d" if sensitive else ""
    return f"SELECT count(*) AS n{d} FROM {source} GROUP BY {', '.join(qis)}"


def _summary_sql(classes: str, with_l: bool) -> str:
    sql = ("SELECT count(*), coalesce(sum(n), 0), min(n), coalesce(sum(CASE WHEN n < :risk_k THEN 1 ELSE 0 END), 0), "
           "coalesce(sum(CASE WHEN n < :risk_k THEN n ELSE 0 END), 0)")
    if with_l:
        sql += (", min(d), coalesce(sum(CASE WHEN d < :risk_l THEN 1 ELSE 0 END), 0), "
                "coalesce(sum(CASE WHEN d < :risk_l THEN n ELSE 0 END), 0)")
    return f"{sql} FROM ({classes}) AS g"


def _figures(spec: RiskSpec, row: Sequence[Any], spilled: int = 0) -> RiskFigures:
    classes, rows, smallest, below, rows_below = (int(v) if v is not None else None for v in row[:5])
    extra: dict[str, Any] = {}
    if spec.l_column:
        extra = {"l_smallest": None if row[5] is None else int(row[5]), "classes_below_l": int(row[6]),
                 "rows_below_l": int(row[7])}
    return RiskFigures(spec, rows or 0, classes or 0, smallest, below or 0, rows_below or 0, spilled=spilled, **extra)


def _histogram_sql(classes: str) -> str:
    return f"SELECT n, count(*) FROM ({classes}) AS g GROUP BY n ORDER BY n"


def size_bins(k: int) -> list[tuple[int, int | None]]:
    """Class-size bins of the report's distribution: every size below ``max(k, 10)`` on its own, then wider."""
    exact = max(k, 10)
    bins: list[tuple[int, int | None]] = [(n, n) for n in range(1, exact)]
    edges = [exact, 20, 50, 100, 1000, 10_000]
    lower = exact
    for upper in edges[1:]:
        if upper > lower:
            bins.append((lower, upper - 1))
            lower = upper
    bins.append((lower, None))
    return bins


def _bin_histogram(sizes: Iterable[tuple[int, int]], k: int) -> list[dict[str, Any]]:
    bins = size_bins(k)
    out = [{"from": lo, "to": hi, "classes": 0, "rows": 0} for lo, hi in bins]
    for n, count in sizes:
        for entry in out:
            if n >= entry["from"] and (entry["to"] is None or n <= entry["to"]):
                entry["classes"] += int(count)
                entry["rows"] += int(count) * int(n)
                break
    return out


# --- taps: the output of a run ------------------------------------------------------------------
def _columns_of(batch: Mapping[str, Sequence[Any]] | pa.RecordBatch | CopyBlock, names: Sequence[str],
                all_columns: Sequence[str]) -> list[Sequence[Any]]:
    """The values of ``names`` in an output batch (COPY text blocks are cut into fields, NULL as ``None``)."""
    if isinstance(batch, pa.RecordBatch):
        return [batch.column(n).to_pylist() for n in names]
    if isinstance(batch, CopyBlock):
        width = len(all_columns)
        fields = split_rows(batch.data[:-1].decode("utf-8"), width) if batch.rows else []
        if fields is None:
            raise PolicyError("risk: an output block of COPY text does not have one field per column")
        return [decode_column(fields[all_columns.index(n)::width]) for n in names]
    return [decode_column(batch[n]) if isinstance(batch[n], CopyText) else batch[n] for n in names]


def _encode(value: Any) -> str:
    """A value as the spill table's text: JSON, typed so that ``1`` and ``"1"`` stay apart; NULL is ``null``."""
    if value is None or isinstance(value, (str, int, bool)):
        return json.dumps(value)
    return json.dumps(f"{type(value).__name__}:{value.isoformat() if hasattr(value, 'isoformat') else value!r}")


_TEXT = {str, type(None)}


def _keys(values: Sequence[Any]) -> Sequence[Any]:
    """A column's values as the in-memory counts key them: text and NULL as they are (no call per value when the
    whole column is text), anything else as a 1-tuple of its encoding, which no text equals (``1`` is not ``"1"``,
    and ``True`` is not ``1``, though Python's ``==`` says so)."""
    if set(map(type, values)) <= _TEXT:
        return values
    return [v if type(v) is str or v is None else (_encode(v),) for v in values]


def _stored(key: Any) -> str:
    """A key of the in-memory counts as the spill table's text (:func:`_encode`'s)."""
    return key[0] if type(key) is tuple else _encode(key)


class SpillCounts:
    """Counts of rows per (quasi-identifier values, sensitive value), at most ``memory_groups`` in memory; the
    rest spilled into an SQLite file in ``directory`` (default: the system's temporary folder), removed on close."""

    def __init__(self, width: int, *, memory_groups: int = MEMORY_GROUPS, directory: str | None = None) -> None:
        if memory_groups < 1:
            raise PolicyError(f"risk: memory_groups must be at least 1, not {memory_groups}")
        self.width = width
        self.memory_groups = memory_groups
        self.spills = 0
        self._counts: Counter[tuple[str, ...]] = Counter()
        fd, self.path = tempfile.mkstemp(prefix="pseudonymise-risk-", suffix=".sqlite", dir=directory)
        os.close(fd)
        # written by the run's writer thread, read by the run's thread once the writes are drained
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("PRAGMA temp_store=FILE")
        self._db.execute("PRAGMA cache_size=-8192")  # 8 MiB: the class counts live on disk, not in memory
        self.qcols = [f"q{i}" for i in range(width)]
        cols = ", ".join(f"{c} TEXT NOT NULL" for c in self.qcols)
        key = ", ".join([*self.qcols, "s"])
        self._db.execute(f"CREATE TABLE counts ({cols}, s TEXT NOT NULL, n INTEGER NOT NULL, UNIQUE ({key}))")
        placeholders = ", ".join("?" * (width + 2))
        self._upsert = (f"INSERT INTO counts ({key}, n) VALUES ({placeholders}) "
                        f"ON CONFLICT ({key}) DO UPDATE SET n = n + excluded.n")

    def add(self, columns: Sequence[Sequence[Any]], sensitive: Sequence[Any] | None) -> None:
        keyed = [_keys(c) for c in columns]
        s = _keys(sensitive) if sensitive is not None else [None] * (len(keyed[0]) if keyed else 0)
        self._counts.update(zip(*keyed, s, strict=True))
        if len(self._counts) > self.memory_groups:
            self._flush()
            self.spills += 1  # a spill: more classes than memory_groups were held

    def _flush(self) -> None:
        """Add the counts held in memory to the file's (as text), and forget them."""
        if not self._counts:
            return
        self._db.execute("BEGIN")
        self._db.executemany(self._upsert, ((*map(_stored, key), n) for key, n in self._counts.items()))
        self._db.execute("COMMIT")
        self._counts.clear()

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Run ``sql`` (``:risk_k``/``:risk_l`` parameters) over the counts, adding what is still in memory first."""
        self._flush()
        text, order = _qmark(sql)
        return self._db.execute(text, [(params or {})[name] for name in order]).fetchall()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._db.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


_PARAMETER = re.compile(r":(risk_k|risk_l)\b")


def _qmark(sql: str) -> tuple[str, list[str]]:
    """``sql`` with ``:risk_k`` and ``:risk_l`` as ``?`` (sqlite3's positional style) and their order."""
    return _PARAMETER.sub("?", sql), _PARAMETER.findall(sql)


class SpillRiskTap:
    """The gate's counts of a run's output batches, spilling to disk beyond ``memory_groups`` classes."""

    def __init__(self, spec: RiskSpec, columns: Sequence[str], *, memory_groups: int = MEMORY_GROUPS,
                 directory: str | None = None) -> None:
        self.spec, self.columns = spec, list(columns)
        self.counts = SpillCounts(len(spec.quasi_identifiers), memory_groups=memory_groups, directory=directory)

    def add(self, batch: Any) -> None:
        values = _columns_of(batch, self.spec.columns, self.columns)
        qis = values[:len(self.spec.quasi_identifiers)]
        self.counts.add(qis, values[-1] if self.spec.l_column else None)

    def figures(self) -> RiskFigures:
        return _spill_figures(self.counts, self.spec, list(range(len(self.spec.quasi_identifiers))))

    def close(self) -> None:
        self.counts.close()


def _spill_figures(counts: SpillCounts, spec: RiskSpec, positions: Sequence[int]) -> RiskFigures:
    classes = _classes("counts", [counts.qcols[i] for i in positions], spec.l_column, weighted=True)
    row = counts.query(_summary_sql(classes, bool(spec.l_column)), {"risk_k": spec.k, "risk_l": spec.l_min})[0]
    return _figures(spec, row, counts.spills)


class PostgresRiskTap:
    """The gate's counts of a run into a PostgreSQL table, grouped in the run's own transaction before the commit.

    With ``table`` (a target the run *replaces*, so that it holds this run's rows alone once they are written),
    the ``GROUP BY`` runs over the target itself. Otherwise the run's output rows are also copied (COPY text)
    into a temporary table of the transaction (dropped at its end), grouped there.
    """

    def __init__(self, spec: RiskSpec, columns: Sequence[str], conn: Connection,
                 table: tuple[str | None, str] | None = None) -> None:
        self.spec, self.columns, self.conn = spec, list(columns), conn
        prep = conn.dialect.identifier_preparer
        self._quote = prep.quote
        self._copy = table is None
        if table is not None:
            schema, name = table
            self.table = f"{prep.quote(schema) + '.' if schema else ''}{prep.quote(name)}"
            return
        self.table = prep.quote(f"_pseudonymise_risk_{uuid.uuid4().hex[:12]}")
        cols = ", ".join(f"{prep.quote(c)} text" for c in self.columns)
        conn.execute(sa.text(f"CREATE TEMP TABLE {self.table} ({cols}) ON COMMIT DROP"))

    def add(self, batch: Any) -> None:
        if not self._copy:
            return
        if isinstance(batch, CopyBlock):
            data = batch.data
        else:
            if isinstance(batch, pa.RecordBatch):
                batch = {n: batch.column(n).to_pylist() for n in self.columns}
            data = build_rows([encode_column(batch[c]) for c in self.columns])
        if not data:
            return
        cols = ", ".join(self._quote(c) for c in self.columns)
        cursor = self.conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.copy_expert(f"COPY {self.table} ({cols}) FROM STDIN", io.BytesIO(data), size=1 << 20)
        finally:
            cursor.close()

    def figures(self) -> RiskFigures:
        spec = self.spec
        if not self._copy and self.conn.execute(sa.text("SELECT to_regclass(:t)"), {"t": self.table}).scalar() is None:
            return RiskFigures(spec, 0, 0, None, 0, 0)  # no row written: the sink creates the table at its commit
        classes = _classes(self.table, [self._quote(q) for q in spec.quasi_identifiers],
                           self._quote(spec.l_column) if spec.l_column else None, weighted=False)
        row = self.conn.execute(sa.text(_summary_sql(classes, bool(spec.l_column))),
                                {"risk_k": spec.k, "risk_l": spec.l_min}).one()
        return _figures(spec, row)

    def close(self) -> None:
        """Nothing to do: the temporary table goes with the transaction."""


# --- the risk report ----------------------------------------------------------------------------
@dataclass
class RiskReport:
    """A table's or file's risk, counts only: the figures over all quasi-identifiers, the class-size
    distribution, and per combination of quasi-identifiers the classes and rows below k."""

    source: str
    figures: RiskFigures
    distribution: list[dict[str, Any]]
    combinations: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, **self.figures.as_dict(), "distribution": self.distribution,
                "combinations": self.combinations}

    def text(self) -> str:
        """A readable table for a terminal."""
        f = self.figures
        lines = [f"risk report of {self.source}: {f.rows} rows, {f.classes} classes over "
                 f"({', '.join(f.spec.quasi_identifiers)}), smallest class {f.smallest_class}, k={f.spec.k}: "
                 f"{f.classes_below_k} classes / {f.rows_below_k} rows below k"
                 + (f"; l={f.spec.l_min} on {f.spec.l_column}: fewest distinct {f.l_smallest}, "
                    f"{f.classes_below_l} classes / {f.rows_below_l} rows below l" if f.spec.l_column else ""),
                 "", "class size      classes         rows"]
        for b in self.distribution:
            size = str(b["from"]) if b["to"] == b["from"] else f"{b['from']}-{b['to'] if b['to'] else ''}"
            lines.append(f"{size:>10} {b['classes']:>12} {b['rows']:>12}")
        lines += ["", f"{'quasi-identifiers':<48} {'classes':>9} {'smallest':>9} {'<k classes':>11} {'<k rows':>9}"]
        for c in self.combinations:
            lines.append(f"{', '.join(c['quasi_identifiers']):<48} {c['classes']:>9} {c['smallest_class'] or 0:>9} "
                         f"{c['classes_below_k']:>11} {c['rows_below_k']:>9}")
        return "\n".join(lines)


def _subsets(qis: Sequence[str]) -> Iterator[tuple[int, ...]]:
    for size in range(1, len(qis) + 1):
        yield from itertools.combinations(range(len(qis)), size)


def _combination(spec: RiskSpec, positions: tuple[int, ...], figures: RiskFigures) -> dict[str, Any]:
    return {"quasi_identifiers": [spec.quasi_identifiers[i] for i in positions], "classes": figures.classes,
            "smallest_class": figures.smallest_class, "classes_below_k": figures.classes_below_k,
            "rows_below_k": figures.rows_below_k}


def _check_report(spec: RiskSpec, columns: Sequence[str], max_qis: int, label: str) -> None:
    missing = [c for c in spec.columns if c not in columns]
    if missing:
        raise PolicyError(f"risk report: column(s) {', '.join(map(repr, missing))} are not in {label} (it has "
                          f"{', '.join(map(repr, columns))})")
    if len(spec.quasi_identifiers) > max_qis:
        raise PolicyError(f"risk report: {len(spec.quasi_identifiers)} quasi-identifiers make "
                          f"{2 ** len(spec.quasi_identifiers) - 1} combinations; name at most {max_qis} (or raise "
                          "max_quasi_identifiers)")


def describe_table(conn: Connection, table: str | None, spec: RiskSpec, *, schema: str | None = None,
                   query: str | None = None, parameters: Mapping[str, Any] | None = None, label: str | None = None,
                   max_quasi_identifiers: int = MAX_REPORT_QIS) -> RiskReport:
    """The risk report of a table (or of a ``query``'s rows, with ``:name`` bind ``parameters``), by ``GROUP BY``
    in its database."""
    prep = conn.dialect.identifier_preparer
    bound = dict(parameters or {})
    if query is not None:
        source = f"({query}) AS src"
        columns = list(conn.execute(sa.text(f"SELECT * FROM ({query}) AS q LIMIT 0"), bound).keys())
    else:
        if table is None:
            raise PolicyError("risk report: name a table or a query")
        found = sa.inspect(conn).has_table(table, schema=schema)
        if not found:
            raise PolicyError(f"risk report: table {(schema + '.') if schema else ''}{table} does not exist")
        source = f"{prep.quote(schema) + '.' if schema else ''}{prep.quote(table)}"
        columns = [c["name"] for c in sa.inspect(conn).get_columns(table, schema=schema)]
    label = label or (f"table:{(schema + '.') if schema else ''}{table}" if table else "query")
    _check_report(spec, columns, max_quasi_identifiers, label)
    q = [prep.quote(c) for c in spec.quasi_identifiers]
    sensitive = prep.quote(spec.l_column) if spec.l_column else None
    params = {**bound, "risk_k": spec.k, "risk_l": spec.l_min}
    classes = _classes(source, q, sensitive, weighted=False)
    figures = _figures(spec, conn.execute(sa.text(_summary_sql(classes, bool(sensitive))), params).one())
    sizes = conn.execute(sa.text(_histogram_sql(classes)), bound).all()
    combos = []
    for positions in _subsets(spec.quasi_identifiers):
        sub = _classes(source, [q[i] for i in positions], None, weighted=False)
        sub_spec = RiskSpec(tuple(spec.quasi_identifiers[i] for i in positions), spec.k)
        combos.append(_combination(spec, positions, _figures(sub_spec, conn.execute(
            sa.text(_summary_sql(sub, False)), params).one())))
    return RiskReport(label, figures, _bin_histogram(sizes, spec.k), combos)


def describe_batches(batches: Iterable[Any], columns: Sequence[str], spec: RiskSpec, label: str, *,
                     memory_groups: int = MEMORY_GROUPS, directory: str | None = None,
                     max_quasi_identifiers: int = MAX_REPORT_QIS) -> RiskReport:
    """The risk report of rows read in batches (a file), counted in a :class:`SpillCounts`."""
    _check_report(spec, columns, max_quasi_identifiers, label)
    tap = SpillRiskTap(spec, columns, memory_groups=memory_groups, directory=directory)
    try:
        for batch in batches:
            tap.add(batch)
        figures = tap.figures()
        counts = tap.counts
        classes = _classes("counts", counts.qcols, spec.l_column, weighted=True)
        sizes = counts.query(_histogram_sql(classes))
        combos = []
        for positions in _subsets(spec.quasi_identifiers):
            sub_spec = RiskSpec(tuple(spec.quasi_identifiers[i] for i in positions), spec.k)
            combos.append(_combination(spec, positions, _spill_figures(counts, sub_spec, positions)))
        return RiskReport(label, figures, _bin_histogram(sizes, spec.k), combos)
    finally:
        tap.close()
