"""CSV and Parquet sources and sinks: encodings, quoting, ragged rows, types and atomic writes."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pseudonymise.core.errors import DataIOError, DelimiterError, InvalidTextError
from pseudonymise.core.files import (
    CsvSink,
    CsvSource,
    ParquetSink,
    ParquetSource,
    file_format,
    open_sink,
    open_source,
)


def read_all(source: CsvSource | ParquetSource) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {c: [] for c in source.columns}
    for batch in source.batches():
        for column, values in batch.items():
            out[column].extend(values)
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial") or p.name.startswith("."))


# --- CSV sources -----------------------------------------------------------------------------
def test_csv_with_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfpatient_id,name\r\nP1,Zo\xc3\xab\r\n")
    source = CsvSource(path)
    assert source.columns == ["patient_id", "name"]
    assert read_all(source) == {"patient_id": ["P1"], "name": ["Zoë"]}


def test_csv_quoted_fields_with_newlines_and_delimiters(tmp_path: Path) -> None:
    path = tmp_path / "quoted.csv"
    path.write_text('id,note\n1,"line one\nline two"\n2,"a, b and ""c"""\n3,plain\n', encoding="utf-8")
    assert read_all(CsvSource(path)) == {"id": ["1", "2", "3"], "note": ["line one\nline two", 'a, b and "c"', "plain"]}


def test_csv_ragged_row_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("a,b\n1,2\n3,4\nP100000\n7,8\n", encoding="utf-8")
    with pytest.raises(DataIOError) as info:
        read_all(CsvSource(path))
    assert "line 4" in str(info.value) and "1 fields" in str(info.value)
    assert "P100000" not in str(info.value)  # no data value
    (tmp_path / "long.csv").write_text("a,b\n1,2,3\n", encoding="utf-8")
    with pytest.raises(DataIOError, match="line 2"):
        read_all(CsvSource(tmp_path / "long.csv"))


def test_csv_ragged_row_after_a_multiline_field_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text('a,b\n1,"x\ny"\n3\n', encoding="utf-8")
    with pytest.raises(DataIOError, match="line 4"):
        read_all(CsvSource(path))


def test_csv_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text("a,b\n1,2\n\n3,4\n", encoding="utf-8")
    assert read_all(CsvSource(path)) == {"a": ["1", "3"], "b": ["2", "4"]}


def test_csv_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("name\nZoë\n".encode("latin-1"))
    with pytest.raises(InvalidTextError, match="UTF-8"):
        read_all(CsvSource(path))


def test_csv_not_utf8_far_into_the_file(tmp_path: Path) -> None:
    path = tmp_path / "late.csv"
    path.write_bytes(b"name\n" + b"plain\n" * 50_000 + "Zoë\n".encode("latin-1"))
    source = CsvSource(path, batch_size=1000)
    with pytest.raises(InvalidTextError) as info:
        read_all(source)
    assert "Zo" not in str(info.value)


def test_csv_empty_field_is_null(tmp_path: Path) -> None:
    path = tmp_path / "nulls.csv"
    path.write_text('a,b,c\n1,,""\n,x,\n', encoding="utf-8")
    assert read_all(CsvSource(path)) == {"a": ["1", None], "b": [None, "x"], "c": [None, None]}


def test_csv_batches(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("id\n" + "".join(f"{i}\n" for i in range(7)), encoding="utf-8")
    sizes = [len(batch["id"]) for batch in CsvSource(path, batch_size=3).batches()]
    assert sizes == [3, 3, 1]


@pytest.mark.parametrize(("content", "match"), [(b"", "empty"), (b"a,a\n1,2\n", "duplicate"), (b"a,,c\n", "empty")])
def test_csv_bad_header(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(DataIOError, match=match):
        CsvSource(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataIOError, match="cannot open"):
        CsvSource(tmp_path / "absent.csv")
    with pytest.raises(DataIOError):
        ParquetSource(tmp_path / "absent.parquet")
    (tmp_path / "not.parquet").write_text("a,b\n")
    with pytest.raises(DataIOError, match="Parquet"):
        ParquetSource(tmp_path / "not.parquet")


def test_file_format_from_extension(tmp_path: Path) -> None:
    assert file_format("a.CSV") == "csv" and file_format("a.txt") == "csv"
    assert file_format("a.parquet") == "parquet" and file_format("a.pq") == "parquet"
    assert file_format("a.data", "csv") == "csv"
    with pytest.raises(DataIOError, match="extension"):
        file_format("a.xlsx")
    with pytest.raises(DataIOError, match="unknown"):
        file_format("a.csv", "json")


# --- Parquet --------------------------------------------------------------------------------
def test_parquet_round_trip_keeps_types(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    data = {"id": [1, 2, None, 2**62], "name": ["Zoë", None, "b", "c"], "flag": [True, False, None, True],
            "day": [dt.date(2026, 1, 1), None, dt.date(1942, 5, 6), dt.date(2000, 2, 29)]}
    sink = ParquetSink(path, list(data))
    sink.write({c: v[:2] for c, v in data.items()})
    sink.write({c: v[2:] for c, v in data.items()})
    sink.commit()
    source = ParquetSource(path, batch_size=3)
    assert source.schema.field("id").type == pa.int64()
    got = read_all(source)
    assert got == data
    assert all(type(v) is int for v in got["id"] if v is not None)
    assert [len(b["id"]) for b in ParquetSource(path, batch_size=3).batches()] == [3, 1]


def test_parquet_sink_with_schema_and_all_null_first_batch(tmp_path: Path) -> None:
    path = tmp_path / "nulls.parquet"
    sink = ParquetSink(path, ["p"])
    sink.write({"p": [None, None]})
    sink.write({"p": ["x"]})
    sink.commit()
    assert pq.read_schema(path).field("p").type == pa.string()
    assert read_all(ParquetSource(path)) == {"p": [None, None, "x"]}


def test_parquet_batch_that_does_not_fit_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    sink = ParquetSink(path, ["id"], schema=pa.schema([pa.field("id", pa.int64())]))
    with pytest.raises(DataIOError, match="schema"):
        sink.write({"id": ["not a number"]})
    assert not path.exists() and leftovers(tmp_path) == []


def test_empty_parquet_output_still_has_columns(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    sink = ParquetSink(path, ["a", "b"])
    sink.commit()
    assert pq.read_schema(path).names == ["a", "b"]
    assert pq.read_table(path).num_rows == 0


# --- CSV sinks and atomic writes ----------------------------------------------------------------
def test_csv_sink_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    sink = CsvSink(path, ["id", "note"])
    sink.write({"id": ["1", "2"], "note": ["line\nbreak", None]})
    sink.commit()
    assert path.read_bytes() == b'id,note\r\n1,"line\nbreak"\r\n2,\r\n'
    assert read_all(CsvSource(path)) == {"id": ["1", "2"], "note": ["line\nbreak", None]}


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_sink_is_invisible_until_commit_and_abort_leaves_nothing(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out.{suffix}"
    sink = open_sink(path, ["a"])
    sink.write({"a": ["1", "2"]})
    assert not path.exists()
    assert len(leftovers(tmp_path)) == 1  # the partial file beside the target
    sink.abort()
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_abort_keeps_the_previous_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out.{suffix}"
    first = open_sink(path, ["a"])
    first.write({"a": ["old"]})
    first.commit()
    before = path.read_bytes()
    second = open_sink(path, ["a"])
    second.write({"a": ["new", "rows"]})
    second.abort()
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []
    assert read_all(open_source(path)) == {"a": ["old"]}


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_commit_replaces_and_leaves_no_partial_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out.{suffix}"
    for rows in (["1"], ["2", "3"]):
        sink = open_sink(path, ["a"])
        sink.write({"a": rows})
        sink.commit()
    assert read_all(open_source(path)) == {"a": ["2", "3"]}
    assert leftovers(tmp_path) == []


def test_sink_into_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataIOError, match="does not exist"):
        open_sink(tmp_path / "nope" / "out.csv", ["a"])


# --- Arrow: record batches in, record batches out -------------------------------------------------
def test_csv_record_batches_are_text_with_nulls_and_bounded_batches(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text('id,name,note\n1,Zoë,""\n2,,"a, ""b""\nc"\n\n3,NULL,NA\n' + "".join(f"{i},n{i},x\n" for i in range(4, 12)),
                    encoding="utf-8")
    batches = list(CsvSource(path, batch_size=4).record_batches())
    assert [b.num_rows for b in batches] == [4, 4, 3]
    assert all(b.schema == pa.schema([(c, pa.string()) for c in ("id", "name", "note")]) for b in batches)
    table = pa.Table.from_batches(batches)
    assert table.column("name").to_pylist()[:3] == ["Zoë", None, "NULL"]  # only the empty field is NULL
    assert table.column("note").to_pylist()[:3] == [None, 'a, "b"\nc', "NA"]
    assert table.column("id").to_pylist() == [str(i) for i in range(1, 12)]


def test_csv_delimiter_encoding_and_null_options(tmp_path: Path) -> None:
    path = tmp_path / "semi.csv"
    path.write_bytes("id;name\n1;Zoë\n2;-\n".encode("latin-1"))
    source = CsvSource(path, delimiter=";", encoding="latin-1", null="-")
    assert read_all(source) == {"id": ["1", "2"], "name": ["Zoë", None]}
    with pytest.raises(DataIOError, match="unknown"):
        CsvSource(path, encoding="no-such-encoding")


def test_csv_long_values_and_a_row_longer_than_a_block(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    long = "é" * 600_000
    path.write_text(f"id,v\n1,{long}\n2,short\n", encoding="utf-8")
    assert read_all(CsvSource(path)) == {"id": ["1", "2"], "v": [long, "short"]}
    huge = tmp_path / "huge.csv"  # a row far longer than the reader's block
    before = "".join(f"{i},{'é' * 300}\n" for i in range(5000))  # 3 MiB: read, and given, before the long row
    huge.write_text("id,v\n" + before + "1," + "P" * (17 << 20) + "\n2,x\n", encoding="utf-8")
    got = read_all(CsvSource(huge, batch_size=700))
    assert [len(v) for v in got["v"]] == [300] * 5000 + [17 << 20, 1]
    assert got["id"] == [str(i) for i in range(5000)] + ["1", "2"]


def _csv_module_bytes(columns: list[str], rows: list[list[Any]]) -> bytes:
    """What the csv module writes (the independent expectation of CsvSink's bytes)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    writer.writerows(rows)
    return text.getvalue().encode("utf-8")


def test_csv_sink_writes_record_batches_as_the_csv_module_does(tmp_path: Path) -> None:
    """Batches that need no quoting go through pyarrow's writer, the others through the csv module; either way
    the file is byte for byte what the csv module writes, whatever the column types."""
    columns = ["s", "n", "d", "b", "big"]
    plain = {"s": ["a", None, "é x"], "n": [1, None, -3], "d": [dt.date(2026, 1, 2), None, dt.date(1, 1, 1)],
             "b": [True, None, False], "big": ["x", "y", None]}
    quoted = {"s": ['q"x', "a,b", "line\nbreak"], "n": [4, 5, 6], "d": [None] * 3, "b": [None] * 3, "big": ["\r", "", "z"]}
    schema = pa.schema([("s", pa.string()), ("n", pa.int64()), ("d", pa.date32()), ("b", pa.bool_()),
                        ("big", pa.large_string())])
    path = tmp_path / "out.csv"
    sink = CsvSink(path, columns)
    for data in (plain, quoted, plain):
        sink.write(pa.RecordBatch.from_pydict(data, schema=schema))
    sliced = pa.RecordBatch.from_pydict(quoted, schema=schema).slice(2)  # its buffers hold the quoted rows too
    sink.write(pa.RecordBatch.from_arrays([sliced.column(0).slice(0, 0), *[c.slice(0, 0) for c in sliced.columns[1:]]],
                                          schema=schema))
    sink.commit()
    rows = [[v for v in row] for data in (plain, quoted, plain) for row in zip(*data.values(), strict=True)]
    assert path.read_bytes() == _csv_module_bytes(columns, rows)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_csv_sink_starts_the_write_back_of_each_batch_and_still_syncs_at_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch's bytes are handed to the disk as written (one range after the other, from the header to the end,
    whichever writer wrote them), and commit() still syncs the whole file before the rename. The system calls are
    recorded and passed on (the write-back itself cannot be observed from here)."""
    advised: list[tuple[int, int, int]] = []
    synced: list[int] = []
    fadvise, fsync = os.posix_fadvise, os.fsync

    def record_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((offset, length, advice))
        fadvise(fd, offset, length, advice)

    def record_fsync(fd: int) -> None:
        synced.append(fd)
        fsync(fd)

    monkeypatch.setattr(os, "posix_fadvise", record_fadvise)
    monkeypatch.setattr(os, "fsync", record_fsync)
    path = tmp_path / "out.csv"
    sink = CsvSink(path, ["a", "b"])
    sink.write(pa.RecordBatch.from_pydict({"a": ["x"] * 1000, "b": ["y"] * 1000}))  # pyarrow's writer
    sink.write(pa.RecordBatch.from_pydict({"a": ['q"'] * 10, "b": ["z"] * 10}))  # the csv module
    sink.write({"a": ["1", "2"], "b": ["3", None]})
    assert not synced
    sink.commit()
    assert len(synced) == 2  # the file before its rename, the folder after (test below)
    assert [advice for _, _, advice in advised] == [os.POSIX_FADV_DONTNEED] * 3
    assert [offset for offset, _, _ in advised] == [0, *[o + n for o, n, _ in advised[:-1]]]
    assert sum(n for _, n, _ in advised) == path.stat().st_size


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_file_is_synced_to_disk_before_its_rename_and_its_folder_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """CSV and Parquet alike: the partial file's data reaches the disk before it is renamed into place, then the
    folder's entry does (a crash leaves the old file or the whole new one). What each fsync was given is read
    from /proc while the call runs."""
    synced: list[str] = []
    fsync = os.fsync

    def record_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record_fsync)
    path = tmp_path / f"out.{fmt}"
    sink = open_sink(path, ["a"])
    sink.write(pa.RecordBatch.from_pydict({"a": ["x", "y"]}))
    sink.commit()
    assert len(synced) == 2
    assert Path(synced[0]).parent == tmp_path and Path(synced[0]).name.endswith(".partial")
    assert synced[1] == str(tmp_path) and path.exists()


def test_csv_sink_one_column_keeps_null_rows(tmp_path: Path) -> None:
    path = tmp_path / "one.csv"
    sink = CsvSink(path, ["p"])
    sink.write(pa.RecordBatch.from_pydict({"p": ["a", None, "b"]}))
    sink.commit()
    assert path.read_bytes() == _csv_module_bytes(["p"], [["a"], [None], ["b"]]) == b'p\r\na\r\n""\r\nb\r\n'
    assert read_all(CsvSource(path)) == {"p": ["a", None, "b"]}


def test_parquet_record_batches_by_row_group_and_sink_keeps_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    schema = pa.schema([("id", pa.int32()), ("pid", pa.large_string()), ("day", pa.date32())])
    table = pa.Table.from_pydict({"id": list(range(10)), "pid": [f"P{i}" for i in range(10)],
                                  "day": [dt.date(2026, 1, 1 + i) for i in range(10)]}, schema=schema)
    pq.write_table(table, path, row_group_size=4)
    source = ParquetSource(path, batch_size=3)
    batches = list(source.record_batches())
    assert [b.num_rows for b in batches] == [3, 3, 3, 1]
    assert all(b.schema == schema for b in batches)
    out = tmp_path / "out.parquet"
    target = pa.schema([("id", pa.int32()), ("pid", pa.string()), ("day", pa.date32())])
    sink = ParquetSink(out, ["id", "pid", "day"], schema=target)
    for batch in batches:
        sink.write(batch)
    sink.commit()
    assert pq.read_schema(out) == target
    assert pq.read_table(out).to_pydict() == table.to_pydict()
    assert pq.ParquetFile(out).metadata.num_row_groups == len(batches)  # one row group per batch written
    bad = ParquetSink(tmp_path / "bad.parquet", ["id"], schema=pa.schema([("id", pa.int64())]))
    with pytest.raises(DataIOError, match=r"'id'.*does not fit") as info:
        bad.write(pa.RecordBatch.from_pydict({"id": ["P770839"]}))
    assert "P770839" not in str(info.value) and leftovers(tmp_path) == []


@pytest.mark.parametrize(("delimiter", "name"), [(";", "';'"), ("\t", "tab"), ("|", "'|'")])
def test_a_csv_read_with_the_wrong_delimiter_is_refused_naming_the_one_it_has(tmp_path: Path, delimiter: str,
                                                                                name: str) -> None:
    """Issue 16: a ';'-separated file read with ',' became one column named 'a;b;c'; now the error names
    the delimiter it saw (never the header's text), and with that delimiter the file is read."""
    path = tmp_path / "visits.csv"
    path.write_text(delimiter.join(["patient_id", "ward", "note"]) + "\n" + delimiter.join(["P1", "w1", "a,b"]) + "\n",
                    encoding="utf-8")
    with pytest.raises(DelimiterError, match=f"looks {name}-separated") as info:
        open_source(path)
    assert info.value.seen == delimiter and "patient_id" not in str(info.value)
    source = open_source(path, delimiter=delimiter)
    assert source.columns == ["patient_id", "ward", "note"]
    assert list(source.batches()) == [{"patient_id": ["P1"], "ward": ["w1"], "note": ["a,b"]}]
    wrong = tmp_path / "comma.csv"
    wrong.write_text("patient_id,ward\nP1,w1\n", encoding="utf-8")
    with pytest.raises(DelimiterError, match="looks ','-separated"):
        open_source(wrong, delimiter=";")


def test_a_one_column_csv_is_not_taken_for_another_delimiter(tmp_path: Path) -> None:
    """One column whose name holds no delimiter, or repeats the same name around it, is a one-column file."""
    for header in ("patient_id", "a;a", "x;"):
        path = tmp_path / "one.csv"
        path.write_text(f"{header}\nP1\n", encoding="utf-8")
        assert open_source(path).columns == [header]
    with pytest.raises(DataIOError, match="one character"):
        open_source(path, delimiter=";;")


# --- reading ahead ---------------------------------------------------------------------------
def _reader_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("pseudonymise-") and t.name.endswith("-reader")]


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_reading_started_early_gives_every_row_once_in_order(tmp_path: Path, suffix: str) -> None:
    """start_reading parses ahead on a thread of its own (the CLI's engine loads meanwhile); record_batches then
    goes on from there: the same rows as a source read the ordinary way, each once, and the thread ends."""
    rows = [{"id": str(i), "name": None if i % 7 == 0 else f"n{i},\"{i}\""} for i in range(2_345)]
    path = tmp_path / f"in.{suffix}"
    if suffix == "csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "name"])
            writer.writerows([[r["id"], r["name"] or ""] for r in rows])
    else:
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=500)
    early = open_source(path, batch_size=100)
    early.start_reading(depth=3)
    early.start_reading(depth=3)  # a second call keeps the reader already started
    got = pa.Table.from_batches(list(early.record_batches()))
    plain = pa.Table.from_batches(list(open_source(path, batch_size=100).record_batches()))
    assert got.equals(plain) and got.num_rows == len(rows)
    assert got.column("name").to_pylist() == [r["name"] for r in rows]
    early.close()
    assert _reader_threads() == []


def test_a_source_closed_before_its_early_reading_is_used_stops_the_reader(tmp_path: Path) -> None:
    """A run refused before its first batch (a denied token, a bad policy) closes the source: the reader started
    ahead stops at once, although it was never asked for a batch."""
    path = tmp_path / "in.csv"
    path.write_text("id\n" + "".join(f"{i}\n" for i in range(50_000)), encoding="utf-8")
    source = CsvSource(path, batch_size=10)
    source.start_reading(depth=2)  # fills its queue, then waits for room
    source.close()
    assert _reader_threads() == []


def test_an_error_found_while_reading_ahead_is_raised_after_the_good_rows(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_bytes(b"id,name\n" + b"".join(b"%d,n\n" % i for i in range(300)) + b"301\n")
    source = CsvSource(path, batch_size=100)
    source.start_reading()
    seen = 0
    with pytest.raises(DataIOError, match="line 302: 1 fields where the header has 2"):
        for batch in source.record_batches():
            seen += batch.num_rows
    assert seen in (0, 100, 200, 300)  # the rows before the error (pyarrow refuses the block holding it)
    source.close()
