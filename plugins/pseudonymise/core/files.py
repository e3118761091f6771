"""CSV and Parquet sources and sinks that move data in batches of columns.

Sources yield ``{column: [values...]}`` batches so memory stays flat in the file size. Sinks
write to a temporary file beside the target and rename it into place on :meth:`commit`, so a
failed run never leaves a half-written file. CSV is read as text: an empty field is NULL.

The errors of the file libraries can quote a cell (pyarrow: ``Could not convert 'P770839' with type
str``; a decoding error names the bytes it could not decode): the plugin's error names the file,
the line or column and the library's exception class, and is raised alone (without that error as
its cause or context) so that no traceback prints the library's text.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pseudonymise.core.errors import DataIOError, InvalidTextError, raise_alone

FORMATS = ("csv", "parquet")
csv.field_size_limit(64 * 1024 * 1024)


def file_format(path: str | os.PathLike[str], explicit: str | None = None) -> str:
    if explicit:
        if explicit not in FORMATS:
            raise DataIOError(f"file format {explicit!r} is unknown; use csv or parquet")
        return explicit
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in ("csv", "txt"):
        return "csv"
    if suffix in ("parquet", "pq"):
        return "parquet"
    raise DataIOError(f"cannot tell the format of {os.fspath(path)!r} from its extension; name it .csv or .parquet, or pass the format")


class CsvSource:
    """A CSV file with a header row, read in batches; UTF-8 (a BOM is skipped)."""

    def __init__(self, path: str | os.PathLike[str], batch_size: int = 50_000, delimiter: str = ",",
                 encoding: str = "utf-8-sig", null: str = "") -> None:
        self.path = os.fspath(path)
        self.batch_size = batch_size
        self._null = null
        try:
            self._fh: IO[str] = open(self.path, encoding=encoding, errors="strict", newline="")  # noqa: SIM115
        except OSError as exc:
            raise DataIOError(f"cannot open {self.path!r}: {exc.strerror}") from exc
        self._reader = csv.reader(self._fh, delimiter=delimiter, strict=True)
        header = self._next()
        if header is None:
            raise DataIOError(f"{self.path!r} is empty; a CSV source needs a header row")
        if len(set(header)) != len(header) or any(not h for h in header):
            raise DataIOError(f"{self.path!r}: the header has empty or duplicate column names")
        self.columns: list[str] = header

    def _next(self) -> list[str] | None:
        try:
            return next(self._reader)
        except StopIteration:
            return None
        except UnicodeDecodeError:
            error: DataIOError | InvalidTextError = InvalidTextError(
                f"{self.path!r} is not valid UTF-8 near line {self._reader.line_num + 1}; convert it to UTF-8 "
                "(for example `iconv -f latin1 -t utf-8`)"
            )
        except csv.Error as exc:
            # the csv module's messages are its own fixed sentences (a quote where a delimiter belongs, a field
            # over the size limit), never a cell
            error = DataIOError(f"{self.path!r} line {self._reader.line_num}: malformed CSV ({exc}); fix the quoting "
                                "of that line")
        raise_alone(error)

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        width, null = len(self.columns), self._null
        try:
            while True:
                rows: list[list[str]] = []
                while len(rows) < self.batch_size:
                    row = self._next()
                    if row is None:
                        break
                    if len(row) != width:
                        if not row:
                            continue
                        raise DataIOError(
                            f"{self.path!r} line {self._reader.line_num}: {len(row)} fields where the header has {width}; "
                            "fix the ragged row (quote fields that contain the delimiter or newlines)"
                        )
                    rows.append(row)
                if not rows:
                    return
                cols = list(zip(*rows, strict=True))
                yield {name: [None if v == null else v for v in col] for name, col in zip(self.columns, cols, strict=True)}
        finally:
            self._fh.close()

    def close(self) -> None:
        self._fh.close()


class ParquetSource:
    """A Parquet file read in record batches; values come out as Python objects (ints stay ints)."""

    def __init__(self, path: str | os.PathLike[str], batch_size: int = 50_000) -> None:
        self.path = os.fspath(path)
        self.batch_size = batch_size
        try:
            self._file = pq.ParquetFile(self.path)
        except (OSError, pa.ArrowException) as exc:
            error = DataIOError(f"cannot read {self.path!r} as Parquet ({exc.__class__.__name__}); check the file")
        else:
            self.schema = self._file.schema_arrow
            self.columns: list[str] = list(self.schema.names)
            return
        raise_alone(error)

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        batches = self._file.iter_batches(batch_size=self.batch_size)
        while True:
            try:
                batch = next(batches)
                columns = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as exc:
                error = DataIOError(f"reading {self.path!r} as Parquet failed ({exc.__class__.__name__}); check the "
                                    "file (it may be truncated or damaged)")
                break
            yield columns
        raise_alone(error)

    def close(self) -> None:
        self._file.close()


def open_source(path: str | os.PathLike[str], fmt: str | None = None, batch_size: int = 50_000) -> CsvSource | ParquetSource:
    if file_format(path, fmt) == "csv":
        return CsvSource(path, batch_size)
    return ParquetSource(path, batch_size)


class _AtomicFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise DataIOError(f"the folder of {os.fspath(path)!r} does not exist; create it first")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)

    def commit(self) -> None:
        os.replace(self.tmp, self.path)
        self.committed = True

    def abort(self) -> None:
        """Remove the partial file; after a commit whose audit then failed, remove the output too."""
        self.tmp.unlink(missing_ok=True)
        if getattr(self, "committed", False):
            self.path.unlink(missing_ok=True)


class CsvSink:
    """Writes a CSV file atomically; NULL is written as an empty field."""

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str], delimiter: str = ",") -> None:
        self._file = _AtomicFile(path)
        self._fh = open(self._file.tmp, "w", encoding="utf-8", newline="")  # noqa: SIM115
        self._writer = csv.writer(self._fh, delimiter=delimiter)
        self.columns = list(columns)
        self._write_rows([self.columns])

    def _write_rows(self, rows: Any) -> None:
        try:
            self._writer.writerows(rows)
        except OSError as exc:
            self.abort()
            raise DataIOError(f"cannot write {os.fspath(self._file.path)!r}: {exc.strerror}; nothing was written") from exc

    def write(self, batch: dict[str, list[Any]]) -> None:
        cols = [batch[c] for c in self.columns]
        self._write_rows(zip(*cols, strict=True))

    def commit(self) -> None:
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        except OSError as exc:
            self.abort()
            raise DataIOError(f"cannot write {os.fspath(self._file.path)!r}: {exc.strerror}; nothing was written") from exc
        self._file.commit()

    def abort(self) -> None:
        if not self._fh.closed:
            with contextlib.suppress(OSError):
                self._fh.close()
        self._file.abort()


class ParquetSink:
    """Writes a Parquet file atomically; the schema comes from ``schema`` or the first batch."""

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str], schema: pa.Schema | None = None) -> None:
        self._file = _AtomicFile(path)
        self.columns = list(columns)
        self._schema = schema
        self._writer: pq.ParquetWriter | None = None

    def write(self, batch: dict[str, list[Any]]) -> None:
        try:
            table = self._table(batch)
            if self._writer is None:
                self._writer = pq.ParquetWriter(self._file.tmp, self._schema)
            self._writer.write_table(table)
        except OSError as exc:  # the operating system's reason (a full disk, say) names no cell
            self.abort()
            raise DataIOError(f"cannot write {os.fspath(self._file.path)!r}: {exc.strerror or type(exc).__name__}; "
                              "nothing was written") from exc
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            self.abort()
            error = DataIOError(f"writing {os.fspath(self._file.path)!r} failed ({exc.__class__.__name__}); nothing "
                                "was written")
        else:
            return
        raise_alone(error)

    def _table(self, batch: dict[str, list[Any]]) -> pa.Table:
        """The batch as a table of the sink's schema (the first batch's types when none was given), column by
        column, so that a value that does not fit is reported by its column (never by its value)."""
        arrays = []
        for name in self._schema.names if self._schema is not None else self.columns:
            field = self._schema.field(name) if self._schema is not None else None
            try:
                array = pa.array(batch[name], type=field.type if field is not None else None)
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                expected = f"the Parquet type {field.type}" if field is not None else "one Parquet type"
                error = DataIOError(
                    f"column {name!r} holds a value that does not fit {expected} ({exc.__class__.__name__}) in "
                    f"{os.fspath(self._file.path)!r}; give the sink an explicit schema, or cast the column to one "
                    "type in the source; nothing was written"
                )
                break
            arrays.append(array.cast(pa.string()) if pa.types.is_null(array.type) and field is None else array)
        else:
            if self._schema is None:
                self._schema = pa.schema([pa.field(n, a.type) for n, a in zip(self.columns, arrays, strict=True)])
            return pa.Table.from_arrays(arrays, schema=self._schema)
        self.abort()
        raise_alone(error)

    def commit(self) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._file.tmp, self._schema or pa.schema([pa.field(c, pa.string()) for c in self.columns]))
        self._writer.close()
        self._file.commit()

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):  # best effort before deleting the partial file
                self._writer.close()
        self._file.abort()


def open_sink(path: str | os.PathLike[str], columns: Sequence[str], fmt: str | None = None,
              schema: pa.Schema | None = None) -> CsvSink | ParquetSink:
    if file_format(path, fmt) == "csv":
        return CsvSink(path, columns)
    return ParquetSink(path, columns, schema)
