"""Lineage: the datasets a task reads and writes, named as OpenLineage and Airflow assets name them, and the
OpenLineage facets of its run (datasets, column lineage with each column's action), never a value or a token.

Names follow the OpenLineage naming conventions: PostgreSQL ``postgres://host:port`` and
``database.schema.table`` (asset URI ``postgres://host:port/database/schema/table``, as the postgres provider
writes it); files ``file://`` and their absolute path (``file:///path``); object storage ``s3://bucket`` and
the key (the URI itself). SQLite, which the conventions do not name, is ``sqlite:<absolute path>`` and
``main.table``. Passwords and logins of a connection never enter a name.

The OpenLineage classes are imported only when a facet is built, which happens only where the OpenLineage
provider is installed (it calls the operators' ``get_openlineage_facets_on_*`` methods).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import Engine

#: the run facet's key in an OpenLineage event
FACET = "pseudonymise"


@dataclass(frozen=True)
class LineageDataset:
    """A dataset as OpenLineage names it (``namespace``, ``name``) and as an Airflow asset names it (``uri``)."""

    namespace: str
    name: str
    uri: str


def table_dataset(engine: Engine, table: str, schema: str | None = None) -> LineageDataset:
    """The dataset of ``table`` in the database of ``engine`` (only its host, port and database are read)."""
    url = engine.url
    backend = url.get_backend_name()
    if backend == "sqlite":
        path = os.path.abspath(url.database or "")
        schema = schema or "main"
        return LineageDataset(f"sqlite:{path}", f"{schema}.{table}", f"sqlite:{path}/{schema}/{table}")
    scheme = "postgres" if backend == "postgresql" else backend
    port = url.port or {"postgresql": 5432, "mysql": 3306, "mssql": 1433}.get(backend)
    authority = f"{url.host or 'localhost'}" + (f":{port}" if port else "")
    schema = schema or ("public" if backend == "postgresql" else "default")
    database = url.database or ""
    return LineageDataset(f"{scheme}://{authority}", f"{database}.{schema}.{table}",
                          f"{scheme}://{authority}/{database}/{schema}/{table}")


def path_dataset(path: str) -> LineageDataset:
    """The dataset of a local path, a ``file://`` URI or an object-storage URI (``s3://bucket/key`` …)."""
    parts = urlsplit(path)
    if not parts.scheme or parts.scheme == "file" or len(parts.scheme) == 1:  # a drive letter is no scheme
        local = os.path.abspath(parts.path if parts.scheme == "file" else path)
        host = parts.netloc if parts.scheme == "file" else ""
        return LineageDataset(f"file://{host}", local, f"file://{host}{local}")
    return LineageDataset(f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/"), path)


def query_origins(sql: str, engine: Engine) -> dict[str, tuple[LineageDataset, str]]:
    """Where each output column of ``sql`` comes from: ``{output column: (table dataset, source column)}``, by
    the OpenLineage SQL parser; columns it cannot trace (an expression over several columns) are left out."""
    from openlineage_sql import parse

    dialect = {"postgresql": "postgres"}.get(engine.url.get_backend_name(), engine.url.get_backend_name())
    meta = parse([sql], dialect=dialect)
    if meta is None:
        return {}
    origins: dict[str, tuple[LineageDataset, str]] = {}
    for lineage in meta.column_lineage:
        if len(lineage.lineage) != 1 or lineage.lineage[0].origin is None:
            continue
        column = lineage.lineage[0]
        origins[lineage.descendant.name] = (table_dataset(engine, column.origin.name, column.origin.schema), column.name)
    return origins


def query_tables(sql: str, engine: Engine) -> list[LineageDataset]:
    """The tables ``sql`` reads, by the OpenLineage SQL parser."""
    from openlineage_sql import parse

    dialect = {"postgresql": "postgres"}.get(engine.url.get_backend_name(), engine.url.get_backend_name())
    meta = parse([sql], dialect=dialect)
    return [] if meta is None else [table_dataset(engine, t.name, t.schema) for t in meta.in_tables]


def _transformation(action: str) -> Any:
    """OpenLineage's description of what ``action`` did to a column: ``keep`` is the identity; any other
    action (pseudonymise, secondary, reverse, and whatever the policy names) a masking transformation,
    except ``reverse``, which unmasks."""
    from openlineage.client.facet_v2 import column_lineage_dataset

    Transformation = column_lineage_dataset.Transformation
    if action == "keep":
        return Transformation(type="DIRECT", subtype="IDENTITY", description="keep", masking=False)
    return Transformation(type="DIRECT", subtype="TRANSFORMATION", description=action, masking=action != "reverse")


def operator_lineage(inputs: Sequence[LineageDataset], outputs: Sequence[LineageDataset],
                     columns: Sequence[tuple[str, str]] | None = None,
                     origins: Mapping[str, tuple[LineageDataset, str]] | None = None,
                     run: Mapping[str, Any] | None = None) -> Any:
    """The ``OperatorLineage`` of a task.

    :param columns: ``(source column, action)`` per source column, in order; every action but ``drop`` gives
        an output column of the same name, traced to its origin (``origins``, else the one input) with the
        action as its transformation. Every output dataset gets this column lineage.
    :param run: the use's summary (``RunSummary.as_dict()``): its operation, audit use id and counts go to the
        ``pseudonymise`` run facet, with the policy's action for each column; its token id does not.
    """
    import attr
    from airflow.providers.common.compat.openlineage.facet import (
        ColumnLineageDatasetFacet,
        Dataset,
        Fields,
        InputField,
        RunFacet,
    )
    from airflow.providers.openlineage.extractors import OperatorLineage

    @attr.define
    class PseudonymiseRunFacet(RunFacet):  # type: ignore[misc]
        """What the use did, by column: the policy's action for each source column (``drop`` included)."""

        operation: str
        columns: dict[str, str]
        counts: dict[str, int]
        auditUseId: str | None = None

    output_facets: dict[str, Any] = {}
    if columns is not None and (origins or len(inputs) == 1):
        fields = {}
        for column, action in columns:
            if action == "drop":
                continue
            origin = (origins or {}).get(column) or ((inputs[0], column) if len(inputs) == 1 else None)
            if origin is None:
                continue
            dataset, source_column = origin
            fields[column] = Fields(
                inputFields=[InputField(namespace=dataset.namespace, name=dataset.name, field=source_column,
                                        transformations=[_transformation(action)])],
            )
        output_facets["columnLineage"] = ColumnLineageDatasetFacet(fields=fields)
    run_facets: dict[str, Any] = {}
    if run is not None:
        run_facets[FACET] = PseudonymiseRunFacet(
            operation=str(run.get("operation", "")), columns=dict(columns or ()),
            # the summary's counts (rows in and out, NULLs, values pseudonymised, escrow rows): numbers only
            counts={k: v for k, v in run.items() if isinstance(v, int) and not isinstance(v, bool)},
            auditUseId=run.get("use_id"))
    return OperatorLineage(
        inputs=[Dataset(namespace=d.namespace, name=d.name) for d in inputs],
        outputs=[Dataset(namespace=d.namespace, name=d.name, facets=dict(output_facets)) for d in outputs],
        run_facets=run_facets)
