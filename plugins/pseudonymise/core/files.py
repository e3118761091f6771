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

import codecs
import contextlib
import csv
import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pa_csv

from pseudonymise.core.errors import DataIOError, DelimiterError, InvalidTextError, raise_alone
from pseudonymise.core.threads import ReadAhead, read_ahead

if TYPE_CHECKING:
    import pyarrow.parquet as pq

FORMATS = ("csv", "parquet")
csv.field_size_limit(64 * 1024 * 1024)
#: The bytes pyarrow's CSV reader parses at a time (a longer row is still read whole). Larger blocks made
#: the reader's memory grow with the file (1M rows: 205 MiB, 3M: 330 MiB at 16 MiB; 143 and 160 at 1 MiB).
_CSV_BLOCK = 1 << 20
_CSV_MAX_BLOCK = 256 << 20
#: how far :meth:`CsvSource.start_reading` reads ahead while a run gets ready and then on: batches, and their bytes
START_DEPTH = 64
START_BYTES = 64 << 20
#: the delimiters a CSV's header is looked at for (:func:`check_delimiter`), with the names messages give them
DELIMITER_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}
#: Linux starts writing a file's dirty pages to the disk, without waiting, when told they are not needed
_WRITE_BACK = getattr(os, "POSIX_FADV_DONTNEED", None) if hasattr(os, "posix_fadvise") else None


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
    """A CSV file with a header row, streamed through pyarrow's incremental reader (``pyarrow.csv.open_csv``) in
    batches of ``batch_size`` rows: every column is read as text (a CSV stays text), an empty field (quoted or
    not) is NULL, blank lines are skipped, fields may hold quoted delimiters and newlines. UTF-8 by default (a
    BOM is skipped); another ``encoding`` is transcoded as it is read. Memory stays flat in the file's size.

    :meth:`record_batches` gives ``pyarrow.RecordBatch`` es of ``pa.string()`` columns (for the C engine);
    :meth:`batches` the same rows as ``{column: [values...]}``. When pyarrow refuses the file, the csv module
    reads it again to name the line and the reason (pyarrow's own messages can quote the row).
    """

    def __init__(self, path: str | os.PathLike[str], batch_size: int = 50_000, delimiter: str = ",",
                 encoding: str = "utf-8-sig", null: str = "") -> None:
        if batch_size < 1:
            raise DataIOError(f"batch_size must be at least 1, not {batch_size}")
        self.path = os.fspath(path)
        self.batch_size = batch_size
        if len(delimiter) != 1 or delimiter in '"\r\n':
            raise DataIOError(f"the CSV delimiter must be one character other than a quote or a line break, "
                              f"not {delimiter!r}")
        self.delimiter = delimiter
        self._delimiter, self._encoding, self._null = delimiter, encoding, null
        self._fh: IO[str] | None = None
        self._ahead = _Started()
        rows = self._stdlib_rows()
        try:
            header = next(rows, None)
        finally:
            self.close()
        if header is None:
            raise DataIOError(f"{self.path!r} is empty; a CSV source needs a header row")
        if len(set(header)) != len(header) or any(not h for h in header):
            raise DataIOError(f"{self.path!r}: the header has empty or duplicate column names")
        self.columns: list[str] = header

    # --- the csv module: the header, and the line to name when pyarrow refuses the file ---
    def _stdlib_rows(self) -> Iterator[list[str]]:
        """The file's rows through the csv module (strict), raising this module's errors (never a cell)."""
        try:
            self._fh = open(self.path, encoding=self._encoding, errors="strict", newline="")  # noqa: SIM115
        except OSError as exc:
            raise DataIOError(f"cannot open {self.path!r}: {exc.strerror}") from exc
        except LookupError:
            raise DataIOError(f"the encoding {self._encoding!r} is unknown; name one Python knows, e.g. utf-8 or "
                              "latin-1") from None
        reader = csv.reader(self._fh, delimiter=self._delimiter, strict=True)
        header = True
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                error: DataIOError | InvalidTextError = InvalidTextError(
                    f"{self.path!r} is not valid UTF-8 near line {reader.line_num + 1}; convert it to UTF-8 "
                    "(for example `iconv -f latin1 -t utf-8`)"
                )
            except csv.Error as exc:
                # the csv module's messages are its own fixed sentences (a quote where a delimiter belongs, a field
                # over the size limit), never a cell
                error = DataIOError(f"{self.path!r} line {reader.line_num}: malformed CSV ({exc}); fix the quoting "
                                    "of that line")
            else:
                if row and not header and len(row) != len(self.columns):
                    raise DataIOError(
                        f"{self.path!r} line {reader.line_num}: {len(row)} fields where the header has "
                        f"{len(self.columns)}; fix the ragged row (quote fields that contain the delimiter or newlines)"
                    )
                if row:
                    header = False
                    yield row
                continue
            raise_alone(error)

    def _refused(self, exc: BaseException) -> DataIOError | InvalidTextError:
        """The error to raise when pyarrow refuses the file: the csv module's, naming the line, when it finds one."""
        try:
            for _row in self._stdlib_rows():
                pass
        except (DataIOError, InvalidTextError) as error:
            return error
        finally:
            self.close()
        return DataIOError(
            f"{self.path!r} could not be read as CSV ({exc.__class__.__name__}); check its quoting and encoding"
        )

    # --- pyarrow: the rows ---
    def _reader(self, block_size: int) -> pa_csv.CSVStreamingReader:
        encoding = "utf8" if codecs.lookup(self._encoding).name in ("utf-8", "utf-8-sig") else self._encoding
        reader = pa_csv.open_csv(
            self.path,
            read_options=pa_csv.ReadOptions(encoding=encoding, block_size=block_size),
            parse_options=pa_csv.ParseOptions(delimiter=self._delimiter, newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(column_types=dict.fromkeys(self.columns, pa.string()),
                                                  null_values=[self._null], strings_can_be_null=True,
                                                  quoted_strings_can_be_null=True),
        )
        if reader.schema.names != self.columns:
            raise DataIOError(f"{self.path!r}: pyarrow reads another header than the csv module; check the "
                              "file's first line and encoding")
        return reader

    def _blocks(self) -> Iterator[pa.RecordBatch]:
        """The reader's blocks of rows. A row longer than a block stops pyarrow's reader: it starts again with
        blocks 16 times as large (up to 256 MiB), skipping the rows it gave already."""
        given, block_size = 0, _CSV_BLOCK
        while True:
            skip = given
            try:
                for batch in self._reader(block_size):
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    batch, skip = batch.slice(skip), 0
                    given += batch.num_rows
                    yield batch
                return
            except pa.ArrowInvalid as exc:  # only its class and this fixed phrase are looked at, never shown
                if "straddl" not in str(exc) or block_size >= _CSV_MAX_BLOCK:
                    raise
                block_size *= 16

    def record_batches(self) -> Iterator[pa.RecordBatch]:
        """The rows as record batches of ``batch_size`` rows (the last may be shorter), every column ``pa.string()``:
        the reader's blocks, joined or cut, parsed on a background thread a batch or two ahead of the caller (or
        as far as :meth:`start_reading` let it)."""
        return self._ahead.take() or read_ahead(self._record_batches(), name="pseudonymise-csv-reader")

    def start_reading(self, depth: int = START_DEPTH, max_bytes: int = START_BYTES) -> None:
        """Start parsing now, on a background thread, up to ``depth`` batches or ``max_bytes`` of them (Arrow's
        buffers) ahead, while the caller gets ready (the command line loads the engine and opens the audit
        meanwhile: the reader uses the core the start leaves idle); the next :meth:`record_batches` goes on from
        there. Only the file is read: no token is used."""
        self._ahead.start(lambda: read_ahead(self._record_batches(), depth, "pseudonymise-csv-reader",
                                             _batch_bytes, max_bytes))

    def _record_batches(self) -> Iterator[pa.RecordBatch]:
        pending: list[pa.RecordBatch] = []
        held = 0
        try:
            for block in self._blocks():
                pending.append(block)
                held += block.num_rows
                while held >= self.batch_size:
                    whole = pending[0] if len(pending) == 1 else pa.concat_batches(pending)
                    yield whole.slice(0, self.batch_size)
                    rest = whole.slice(self.batch_size)
                    pending, held = ([rest] if rest.num_rows else []), rest.num_rows
        except (pa.ArrowException, OSError, UnicodeError) as exc:
            error = self._refused(exc)
        else:
            if held:
                yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)
            return
        raise_alone(error)

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        batches = self.record_batches()
        try:
            for batch in batches:
                yield {name: column.to_pylist() for name, column in zip(self.columns, batch.columns, strict=True)}
        finally:
            _close(batches)

    def close(self) -> None:
        self._ahead.stop()
        if self._fh is not None:
            self._fh.close()


class ParquetSource:
    """A Parquet file streamed in record batches (row groups read one after the other, so memory stays flat): as
    ``pyarrow.RecordBatch`` es of the file's own types (:meth:`record_batches`), or as Python objects
    (:meth:`batches`; ints stay ints)."""

    def __init__(self, path: str | os.PathLike[str], batch_size: int = 50_000) -> None:
        import pyarrow.parquet as pq

        self.path = os.fspath(path)
        self.batch_size = batch_size
        self._ahead = _Started()
        try:
            self._file = pq.ParquetFile(self.path)
        except (OSError, pa.ArrowException) as exc:
            error = DataIOError(f"cannot read {self.path!r} as Parquet ({exc.__class__.__name__}); check the file")
        else:
            self.schema = self._file.schema_arrow
            self.columns: list[str] = list(self.schema.names)
            return
        raise_alone(error)

    def record_batches(self) -> Iterator[pa.RecordBatch]:
        """The file's record batches as pyarrow streams them (row groups read one after the other), of ``batch_size``
        rows but the last, decoded on a background thread a batch or two ahead of the caller (or as far as
        :meth:`start_reading` let it)."""
        return self._ahead.take() or read_ahead(self._record_batches(), name="pseudonymise-parquet-reader")

    def start_reading(self, depth: int = START_DEPTH, max_bytes: int = START_BYTES) -> None:
        """As :meth:`CsvSource.start_reading`: decode the first batches now, on a background thread."""
        self._ahead.start(lambda: read_ahead(self._record_batches(), depth, "pseudonymise-parquet-reader",
                                             _batch_bytes, max_bytes))

    def _record_batches(self) -> Iterator[pa.RecordBatch]:
        batches = self._file.iter_batches(batch_size=self.batch_size)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as exc:
                error = self._damaged(exc)
                break
            yield batch
        raise_alone(error)

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        batches = self.record_batches()
        try:
            for batch in batches:
                try:
                    columns = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
                except (pa.ArrowException, ValueError, OverflowError) as exc:  # a value Python cannot hold
                    error = self._damaged(exc)
                    break
                yield columns
            else:
                return
        finally:
            _close(batches)
        raise_alone(error)

    def _damaged(self, exc: BaseException) -> DataIOError:
        return DataIOError(f"reading {self.path!r} as Parquet failed ({exc.__class__.__name__}); check the file (it may "
                           "be truncated or damaged)")

    def close(self) -> None:
        self._ahead.stop()
        self._file.close()


class _Started:
    """A source's reader started ahead of time (:meth:`CsvSource.start_reading`), until a caller takes it."""

    def __init__(self) -> None:
        self._reader: ReadAhead[pa.RecordBatch] | None = None

    def start(self, reader: Any) -> None:
        if self._reader is None:
            self._reader = reader()

    def take(self) -> ReadAhead[pa.RecordBatch] | None:
        reader, self._reader = self._reader, None
        return reader

    def stop(self) -> None:
        if self._reader is not None:
            self.take().close()  # type: ignore[union-attr]


def _close(batches: Iterator[Any]) -> None:
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def check_delimiter(source: CsvSource) -> None:
    """Refuse a CSV read with the wrong delimiter: a header that is one column holding another common
    delimiter, which splits it into several distinct names, means the file is separated by that one
    (:class:`DelimiterError` naming it). Only the delimiter is named, never the header's text."""
    if len(source.columns) != 1:
        return
    header = source.columns[0]
    for seen, name in DELIMITER_NAMES.items():
        parts = [p.strip() for p in header.split(seen)]
        if seen != source.delimiter and len(parts) > 1 and all(parts) and len(set(parts)) == len(parts):
            raise DelimiterError(
                f"{source.path!r} looks {name}-separated: its header is one column holding "
                f"{name}, and it is read with {DELIMITER_NAMES.get(source.delimiter, repr(source.delimiter))} "
                f"as the delimiter; name the delimiter {name}", seen)


def _batch_bytes(batch: pa.RecordBatch) -> int:
    """The bytes a batch holds in memory (its buffers; a slice counts its share)."""
    return int(batch.nbytes)


def open_source(path: str | os.PathLike[str], fmt: str | None = None, batch_size: int = 50_000,
                delimiter: str = ",") -> CsvSource | ParquetSource:
    """A CSV (separated by ``delimiter``, checked by :func:`check_delimiter`) or Parquet source."""
    if file_format(path, fmt) == "csv":
        source = CsvSource(path, batch_size, delimiter)
        check_delimiter(source)
        return source
    return ParquetSource(path, batch_size)


class _AtomicFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise DataIOError(f"the folder of {os.fspath(path)!r} does not exist; create it first")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)

    def sync(self) -> None:
        """Make the written file durable before it is renamed into place (a crash then leaves the old file or
        the whole new one, never a renamed file whose data never reached the disk)."""
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self) -> None:
        os.replace(self.tmp, self.path)
        self.committed = True
        with contextlib.suppress(OSError):  # the rename itself, where the folder can be synced (not on Windows)
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        """Remove the partial file; after a commit whose audit then failed, remove the output too."""
        self.tmp.unlink(missing_ok=True)
        if getattr(self, "committed", False):
            self.path.unlink(missing_ok=True)


class CsvSink:
    """Writes a CSV file atomically, byte for byte as the csv module writes it (``csv.writer``'s defaults: a field
    quoted only when it holds the delimiter, a quote or a line break; CRLF line ends; NULL an empty field).

    Batches are ``{column: [values...]}`` or ``pyarrow.RecordBatch`` es. The header goes through the csv module;
    a batch none of whose fields needs quoting through pyarrow's writer (``pyarrow.csv.CSVWriter`` with
    ``quoting_style="none"``, which then writes exactly those bytes), any other batch and every batch of a
    one-column file through the csv module: pyarrow's ``"needed"`` style would quote every text field, and it
    writes a one-column row holding NULL as a blank line, which a reader skips (the csv module writes ``""``).
    Values that are not text are written as ``str()`` writes them, as the csv module does.
    """

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str], delimiter: str = ",") -> None:
        self._file = _AtomicFile(path)
        self.columns = list(columns)
        self._delimiter = delimiter
        self._special = f'{delimiter}"\r\n'.encode()
        self._out: pa.NativeFile | None = None
        self._arrow: pa_csv.CSVWriter | None = None
        self._written_back = 0  # bytes whose write-back to the disk has been started
        try:
            self._out = pa.OSFile(os.fspath(self._file.tmp), "wb")
            self._write_text([self.columns])
        except OSError as exc:
            self.abort()
            raise DataIOError(f"cannot write {os.fspath(self._file.path)!r}: {exc.strerror}; nothing was written") from exc

    def _write_text(self, rows: Any) -> None:
        """Rows through the csv module, as UTF-8."""
        text = io.StringIO()
        csv.writer(text, delimiter=self._delimiter).writerows(rows)
        assert self._out is not None
        self._out.write(text.getvalue().encode("utf-8"))

    def _needs_quoting(self, array: pa.StringArray) -> bool:
        """Whether any value of a text array holds the delimiter, a quote or a line break (its bytes only: a
        slice's buffers hold other rows too)."""
        import numpy as np

        _validity, offsets, data = array.buffers()
        if data is None or not len(array):
            return False
        bounds = np.frombuffer(offsets, dtype=np.int32)[[array.offset, array.offset + len(array)]]
        raw = np.frombuffer(data, dtype=np.uint8)[bounds[0]:bounds[1]]
        return any(bool((raw == byte).any()) for byte in self._special)

    def write(self, batch: dict[str, list[Any]] | pa.RecordBatch) -> None:
        try:
            if isinstance(batch, pa.RecordBatch):
                arrays = [_csv_text(batch.column(c)) for c in self.columns]
                if len(arrays) > 1 and not any(map(self._needs_quoting, arrays)):
                    self._write_arrow(pa.RecordBatch.from_arrays(arrays, names=self.columns))
                    self._start_write_back()
                    return
                columns: list[list[Any]] = [a.to_pylist() for a in arrays]
            else:
                columns = [batch[c] for c in self.columns]
            self._write_text(zip(*columns, strict=True))
            self._start_write_back()
        except OSError as exc:
            self.abort()
            raise DataIOError(f"cannot write {os.fspath(self._file.path)!r}: {exc.strerror}; nothing was written") from exc

    def _start_write_back(self) -> None:
        """Have the system start writing the batch just written to the disk, without waiting for it: the fsync
        before the rename then waits for the last batches only, not for the whole file (Linux starts the write-back
        of a range's dirty pages on ``POSIX_FADV_DONTNEED``; elsewhere this does nothing)."""
        if _WRITE_BACK is None or self._out is None:
            return
        end = self._out.tell()
        with contextlib.suppress(OSError):  # advice only: the fsync in commit() is what makes the file durable
            os.posix_fadvise(self._out.fileno(), self._written_back, end - self._written_back, _WRITE_BACK)
        self._written_back = end

    def _write_arrow(self, batch: pa.RecordBatch) -> None:
        if self._arrow is None:
            assert self._out is not None
            self._arrow = pa_csv.CSVWriter(self._out, batch.schema, write_options=pa_csv.WriteOptions(
                include_header=False, delimiter=self._delimiter, eol="\r\n", quoting_style="none"))
        self._arrow.write_batch(batch)

    def commit(self) -> None:
        try:
            if self._arrow is not None:
                self._arrow.close()
            if self._out is not None:
                self._out.close()
            self._file.sync()
        except OSError as exc:
            self.abort()
            raise DataIOError(f"cannot write {os.fspath(self._file.path)!r}: {exc.strerror}; nothing was written") from exc
        self._file.commit()

    def abort(self) -> None:
        for closing in (self._arrow, self._out):
            if closing is not None:
                with contextlib.suppress(Exception):  # best effort before deleting the partial file
                    closing.close()
        self._file.abort()


def _csv_text(array: pa.Array) -> pa.StringArray:
    """A column as the csv module writes it: text as it is, integers and dates (whose Arrow text is Python's
    ``str()``) cast, any other type through ``str()`` of its Python values; NULL stays NULL."""
    kind = array.type
    if kind == pa.string():
        return array
    if pa.types.is_large_string(kind) or pa.types.is_integer(kind) or pa.types.is_date32(kind):
        return array.cast(pa.string())
    return pa.array([None if v is None else v if type(v) is str else str(v) for v in array.to_pylist()],
                    type=pa.string())


class ParquetSink:
    """Writes a Parquet file atomically, one row group per batch (``{column: [values...]}`` or a
    ``pyarrow.RecordBatch``); the schema comes from ``schema`` or the first batch."""

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str], schema: pa.Schema | None = None) -> None:
        self._file = _AtomicFile(path)
        self.columns = list(columns)
        self._schema = schema
        self._writer: pq.ParquetWriter | None = None

    def write(self, batch: dict[str, list[Any]] | pa.RecordBatch) -> None:
        try:
            table = self._table(batch)
            if self._writer is None:
                import pyarrow.parquet as pq

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

    def _table(self, batch: dict[str, list[Any]] | pa.RecordBatch) -> pa.Table:
        """The batch as a table of the sink's schema (the first batch's types when none was given), column by
        column, so that a value that does not fit is reported by its column (never by its value)."""
        arrow = isinstance(batch, pa.RecordBatch)
        arrays = []
        for name in self._schema.names if self._schema is not None else self.columns:
            field = self._schema.field(name) if self._schema is not None else None
            try:
                if arrow:
                    array = batch.column(name)
                    if field is not None and array.type != field.type:
                        array = array.cast(field.type)
                else:
                    array = pa.array(batch[name], type=field.type if field is not None else None)
            except (pa.ArrowException, TypeError, ValueError, OverflowError, KeyError) as exc:
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
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(self._file.tmp, self._schema or pa.schema([pa.field(c, pa.string()) for c in self.columns]))
        try:
            self._writer.close()
            self._file.sync()
        except OSError as exc:
            self.abort()
            raise DataIOError(f"cannot write {os.fspath(self._file.path)!r}: {exc.strerror}; nothing was written") from exc
        self._file.commit()

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):  # best effort before deleting the partial file
                self._writer.close()
        self._file.abort()


def open_sink(path: str | os.PathLike[str], columns: Sequence[str], fmt: str | None = None,
              schema: pa.Schema | None = None, delimiter: str = ",") -> CsvSink | ParquetSink:
    if file_format(path, fmt) == "csv":
        return CsvSink(path, columns, delimiter)
    return ParquetSink(path, columns, schema)
