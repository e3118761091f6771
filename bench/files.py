"""The benchmark's file cases: one generated CSV (and the same rows in Parquet), each case a whole process.

    copy     pyarrow read_csv + write_csv, no transformation (the limit for a file path)
    cli      this project's CLI, ``pseudonymise file pseudonymise`` (deterministic, irreversible)
    hmac     a hand-written script: the csv module and hmac per value
    presidio Presidio's structured engine (presidio-structured on pandas), a salted SHA-256 ``hash`` operator
    parquet  pyarrow read_table + write_table, and the CLI, on the Parquet file
    deid     the CLI with de-identifying actions (patient_id pseudonymised, visit_date shifted per patient, mrn
             masked, ward to a prefix), on the CSV and on the Parquet file

Every case runs as its own process (interpreter start and imports included, as a user runs it), timed by the
parent with its CPU time and peak memory (``os.wait4``). Outputs are checked against an independent
computation: docs/design.md §4 with the standard library's ``hmac`` for the CLI and the script (whose bytes must also
equal the CLI's), ``hashlib.sha256(value + salt)`` for Presidio, the source rows for the copies, docs/design.md §4.7 and
the actions' definitions in the standard library for the de-identifying runs.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LABEL = b"pseudonymise/v1\x00\x00"  # docs/design.md §4: label, then the (empty) domain and NUL
COLUMNS = ("id", "patient_id", "mrn", "visit_date", "ward")
PSEUDONYMISED = ("patient_id", "mrn")
WARDS = ("cardiology", "oncology", "general", "paediatrics", "neurology", "Notaufnahme Süd", "maternité", "icu")
SALT = b"bench-presidio-salt-0123456789ab"  # Presidio's hash operator wants 16 bytes or more
CASES = {
    "file-copy": "CSV: pyarrow read_csv + write_csv, no transformation",
    "file-cli": "CSV: pseudonymise file pseudonymise (this project's CLI)",
    "file-hmac": "CSV: hand-written csv module + hmac per value",
    "file-presidio": "CSV: Presidio structured engine (pandas, salted SHA-256 hash)",
    "file-parquet-copy": "Parquet: pyarrow read_table + write_table, no transformation",
    "file-parquet-cli": "Parquet: pseudonymise file pseudonymise (this project's CLI)",
    "file-deid-cli": "CSV: the CLI with date_shift, mask and generalise",
    "file-parquet-deid-cli": "Parquet: the CLI with date_shift, mask and generalise",
}
#: the de-identifying cases' column policy (issue 15; docs/deidentification.md)
DEID_POLICY = {"columns": {
    "id": "keep", "patient_id": "pseudonymise",
    "visit_date": {"action": "date_shift", "subject": "patient_id", "max_days": 30},
    "mrn": {"action": "mask", "keep_last": 4}, "ward": {"action": "generalise", "prefix": 3}}}
DATE_SHIFT_LABEL = b"pseudonymise/v1/date-shift\x00\x00"  # docs/design.md §4.7: label, the (empty) domain and NUL

# Every case's process reports its own peak memory at exit: VmHWM starts afresh at exec, whereas the rusage
# of a child forked from this (large) process counts the pages it shared before its exec.
PEAK = r"""
import atexit, sys
def _peak():
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    print("PEAK-RSS-KIB", kib, file=sys.stderr)
atexit.register(_peak)
"""
CLI_SCRIPT = PEAK + r"""
import runpy
sys.argv[0] = "pseudonymise"
runpy.run_module("pseudonymise.cli", run_name="__main__", alter_sys=True)
"""

HMAC_SCRIPT = PEAK + r"""
import base64, csv, hashlib, hmac, sys, unicodedata
key = bytes.fromhex(sys.argv[3])
label = b"pseudonymise/v1\x00\x00"
def pseudonym(value):
    mac = hmac.new(key, label + unicodedata.normalize("NFC", value).encode(), hashlib.sha256).digest()
    return base64.b32encode(mac).decode().lower()[:26]
with open(sys.argv[1], newline="", encoding="utf-8") as src, open(sys.argv[2], "w", newline="", encoding="utf-8") as dst:
    rows, out = csv.reader(src), csv.writer(dst)
    out.writerow(next(rows))
    for row in rows:
        row[1] = pseudonym(row[1]) if row[1] else ""
        row[2] = pseudonym(row[2]) if row[2] else ""
        out.writerow(row)
"""

COPY_SCRIPT = PEAK + r"""
import sys
import pyarrow as pa, pyarrow.csv as pc
names = ["id", "patient_id", "mrn", "visit_date", "ward"]
table = pc.read_csv(sys.argv[1], convert_options=pc.ConvertOptions(column_types={n: pa.string() for n in names}))
pc.write_csv(table, sys.argv[2])
"""

PARQUET_COPY_SCRIPT = PEAK + r"""
import sys
import pyarrow.parquet as pq
pq.write_table(pq.read_table(sys.argv[1]), sys.argv[2])
"""

PRESIDIO_SCRIPT = PEAK + r"""
import sys
import pandas as pd
from presidio_anonymizer.entities import OperatorConfig
from presidio_structured import PandasDataProcessor, StructuredAnalysis, StructuredEngine
frame = pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False)
analysis = StructuredAnalysis(entity_mapping={"patient_id": "ID", "mrn": "ID"})
operators = {"ID": OperatorConfig("hash", {"hash_type": "sha256", "salt": bytes.fromhex(sys.argv[3])})}
StructuredEngine(PandasDataProcessor()).anonymize(frame, analysis, operators).to_csv(sys.argv[2], index=False)
"""


def generate(path: Path, rows: int) -> None:
    """The visits of bench/run.py's table as CSV: ~4 visits per patient, 2% without MRN, one identifier in a
    thousand in NFD or holding a tab and a backslash, a ward with a space or an accent."""
    base = dt.date(2020, 1, 1)
    patients = max(rows // 4, 1)
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(COLUMNS)
        for g in range(1, rows + 1):
            p = 1 + (g * 2654435761) % patients
            pid = f"Pe\u0301{p}" if p % 997 == 0 else f"P\t{p}\\" if p % 1999 == 0 else f"P{p:09d}"
            mrn = "" if g % 50 == 0 else f"MRN-{p * 7 + 13:010d}"
            out.writerow([g, pid, mrn, (base + dt.timedelta(days=g % 1826)).isoformat(), WARDS[g % len(WARDS)]])


def to_parquet(csv_path: Path, parquet_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.csv as pc
    import pyarrow.parquet as pq

    types = {"id": pa.int64(), "patient_id": pa.string(), "mrn": pa.string(), "visit_date": pa.date32(),
             "ward": pa.string()}
    table = pc.read_csv(csv_path, convert_options=pc.ConvertOptions(column_types=types))
    pq.write_table(table, parquet_path, row_group_size=100_000)


def pseudonym(key: bytes, value: str | None) -> str | None:
    """docs/design.md §4 in the standard library: NFC, HMAC-SHA256 with the label, base32 lowercase, 26 characters."""
    if value is None:
        return None
    mac = hmac.new(key, LABEL + unicodedata.normalize("NFC", value).encode("utf-8"), hashlib.sha256).digest()
    return base64.b32encode(mac).decode("ascii").lower()[:26]


def shifted(key: bytes, subject: str | None, day: dt.date | None) -> dt.date | None:
    """docs/design.md §4.7 in the standard library: the subject's non-zero offset of at most 30 days added to ``day``."""
    if subject is None or day is None:
        return None
    mac = hmac.new(key, DATE_SHIFT_LABEL + unicodedata.normalize("NFC", subject).encode("utf-8"), hashlib.sha256)
    offset = int.from_bytes(mac.digest()[:8], "big") % 60 - 30
    return day + dt.timedelta(days=offset + 1 if offset >= 0 else offset)


def masked(value: str | None) -> str | None:
    """All but the last 4 characters as ``*`` (all of them when there are 4 or fewer)."""
    if value is None:
        return None
    return "*" * len(value) if len(value) <= 4 else "*" * (len(value) - 4) + value[-4:]


@dataclass
class Run:
    case: str
    rows: int
    seconds: float
    cpu: float
    peak_rss_mib: float


def run_process(command: Sequence[str], env: dict[str, str], log: Path) -> tuple[float, float, float]:
    """Run one case's process: (wall seconds, CPU seconds from its rusage, peak RSS MiB as it reported it)."""
    with log.open("w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(list(command), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    peaks = [line.split()[1] for line in text.splitlines() if line.startswith("PEAK-RSS-KIB ")]
    if proc.returncode != 0 or not peaks:
        raise RuntimeError(f"{command[:4]} failed (exit {proc.returncode}):\n{text[-3000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, int(peaks[-1]) / 1024


def _csv_rows(path: Path) -> Iterator[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader)
        yield from reader


class FileBench:
    """The file cases of one benchmark run, in a folder of their own."""

    def __init__(self, work: Path, rows: int, token: str, jwks: str, key: bytes, skip: set[str],
                 check: Callable[[str, bool, str], None], presidio_rows: int | None = None) -> None:
        self.work, self.rows, self.key, self.skip, self.check = work, rows, key, skip, check
        #: Presidio takes about a millisecond a row: it runs on a file of its own, of this many rows
        self.presidio_rows = min(rows, presidio_rows or rows)
        work.mkdir(parents=True, exist_ok=True)
        (work / "det.token").write_text(token)
        (work / "issuer-keys.json").write_text(jwks)
        (work / "deid-policy.json").write_text(json.dumps(DEID_POLICY))
        self.csv, self.parquet = work / "visits.csv", work / "visits.parquet"
        self.presidio_csv = self.csv if self.presidio_rows == rows else work / "visits-presidio.csv"
        # a user's installed package has its bytecode compiled: let the cases write theirs (the test
        # harness may forbid it), and compile it once before anything is timed
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "plugins"), str(ROOT)])
        self.presidio = True

    def cases(self) -> list[str]:
        return [c for c in CASES if c not in self.skip and "files" not in self.skip
                and not (c == "file-presidio" and not self.presidio)]

    def setup(self) -> None:
        started = time.perf_counter()
        generate(self.csv, self.rows)
        to_parquet(self.csv, self.parquet)
        if self.presidio_csv != self.csv and "file-presidio" not in self.skip:
            generate(self.presidio_csv, self.presidio_rows)
        print(f"generated {self.csv.name} and {self.parquet.name}: {self.rows:,} rows in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        subprocess.run([sys.executable, "-m", "pseudonymise.cli", "--help"], env=self.env, check=True,
                       capture_output=True, cwd=ROOT)
        if "file-presidio" not in self.skip:
            found = subprocess.run([sys.executable, "-c", "import presidio_structured"], env=self.env,
                                   capture_output=True, text=True)
            if found.returncode != 0:
                self.presidio = False
                print("  presidio-structured cannot be imported here (pip install -r requirements.txt); its case is "
                      "left out", flush=True)

    def command(self, case: str, out: Path) -> list[str]:
        cli = [sys.executable, "-c", CLI_SCRIPT, "file", "pseudonymise", "--columns", ",".join(PSEUDONYMISED),
               "--default", "keep", "--token-file", str(self.work / "det.token"),
               "--issuer-keys", str(self.work / "issuer-keys.json"), "--db", f"sqlite:///{out}.audit.db"]
        return {
            "file-copy": [sys.executable, "-c", COPY_SCRIPT, str(self.csv), str(out)],
            "file-cli": [*cli[:5], str(self.csv), str(out), *cli[5:]],
            "file-hmac": [sys.executable, "-c", HMAC_SCRIPT, str(self.csv), str(out), self.key.hex()],
            "file-presidio": [sys.executable, "-c", PRESIDIO_SCRIPT, str(self.presidio_csv), str(out), SALT.hex()],
            "file-parquet-copy": [sys.executable, "-c", PARQUET_COPY_SCRIPT, str(self.parquet), str(out)],
            "file-parquet-cli": [*cli[:5], str(self.parquet), str(out), *cli[5:]],
            "file-deid-cli": [*cli[:5], str(self.csv), str(out), "--policy", str(self.work / "deid-policy.json"),
                              *cli[9:]],
            "file-parquet-deid-cli": [*cli[:5], str(self.parquet), str(out), "--policy",
                                      str(self.work / "deid-policy.json"), *cli[9:]],
        }[case]

    def output(self, case: str, rep: int) -> Path:
        return self.work / f"{case}-{rep}.{'parquet' if 'parquet' in case else 'csv'}"

    def run(self, case: str, rep: int) -> Run:
        out = self.output(case, rep)
        for stale in (out, Path(f"{out}.audit.db")):
            stale.unlink(missing_ok=True)
        seconds, cpu, rss = run_process(self.command(case, out), self.env, self.work / f"{case}-{rep}.log")
        rows = self.presidio_rows if case == "file-presidio" else self.rows
        result = Run(case, rows, seconds, cpu, rss)
        print(f"  {CASES[case]:<70} {rows:>10,} rows {seconds:8.2f} s {rows / seconds:>10,.0f} rows/s  "
              f"{rss:6.0f} MiB  (CPU s: {cpu:.1f})", flush=True)
        return result

    # checks --------------------------------------------------------------------------------------
    def verify(self, case: str) -> None:
        out = self.output(case, 1)
        if case == "file-copy":
            same = sum(a == b for a, b in zip(_csv_rows(self.csv), _csv_rows(out), strict=True))
            self.check("file copy equals the source", same == self.rows, f"{same:,} of {self.rows:,} rows equal")
        elif case == "file-cli":
            bad = rows = 0
            for source, got in zip(_csv_rows(self.csv), _csv_rows(out), strict=True):
                rows += 1
                want = [source[0], pseudonym(self.key, source[1] or None) or "", pseudonym(self.key, source[2] or None)
                        or "", source[3], source[4]]
                bad += got != want
            self.check("file CLI equals docs/design.md §4 (stdlib hmac)", bad == 0 and rows == self.rows,
                       f"{rows:,} rows compared, {bad} differ")
        elif case == "file-hmac":
            cli = self.output("file-cli", 1)
            same = cli.exists() and cli.read_bytes() == out.read_bytes()
            self.check("hand-written csv + hmac equals the CLI byte for byte", same,
                       "same bytes" if same else "the files differ (or the CLI case did not run)")
        elif case == "file-presidio":
            bad = rows = 0
            for source, got in zip(_csv_rows(self.presidio_csv), _csv_rows(out), strict=True):
                rows += 1
                want = [hashlib.sha256(v.encode() + SALT).hexdigest() for v in source[1:3]]
                bad += got[1:3] != want or got[0] != source[0] or got[3:] != source[3:]
            self.check("Presidio equals sha256(value + salt)", bad == 0 and rows == self.presidio_rows,
                       f"{rows:,} rows compared, {bad} differ")
        elif case == "file-parquet-copy":
            import pyarrow.parquet as pq

            same = pq.read_table(out).equals(pq.read_table(self.parquet))
            self.check("Parquet copy equals the source", same, f"{self.rows:,} rows")
        elif case == "file-parquet-cli":
            self._verify_parquet(out)
        elif case in ("file-deid-cli", "file-parquet-deid-cli"):
            self._verify_deidentified(case, out)

    def _verify_deidentified(self, case: str, out: Path) -> None:
        """Each output row against the source row, computed with the standard library."""
        import pyarrow as pa
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq

        if case == "file-deid-cli":
            def text_table(path: Path) -> list[dict[str, Any]]:
                return pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(  # type: ignore[no-any-return]
                    column_types=dict.fromkeys(COLUMNS, pa.string()), strings_can_be_null=True)).to_pylist()

            source, got = text_table(self.csv), text_table(out)
            day = dt.date.fromisoformat
        else:
            source, got = pq.read_table(self.parquet).to_pylist(), pq.read_table(out).to_pylist()

            def day(value: dt.date) -> dt.date:
                return value
        bad = unshifted = 0
        for s, g in zip(source, got, strict=True):
            want_day = shifted(self.key, s["patient_id"], None if s["visit_date"] is None else day(s["visit_date"]))
            got_day = None if g["visit_date"] is None else day(g["visit_date"])
            bad += (g["id"] != s["id"] or g["patient_id"] != pseudonym(self.key, s["patient_id"]) or got_day != want_day
                    or g["mrn"] != masked(s["mrn"]) or g["ward"] != unicodedata.normalize("NFC", s["ward"])[:3])
            unshifted += got_day == day(s["visit_date"])
        self.check(f"{CASES[case].split(':')[0]} de-identified CLI equals docs/design.md §4/§4.7 (stdlib)",
                   bad == 0 and unshifted == 0 and len(got) == self.rows,
                   f"{len(got):,} rows compared, {bad} differ, {unshifted} dates unshifted")

    def _verify_parquet(self, out: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        source, got = pq.read_table(self.parquet), pq.read_table(out)
        schema_ok = got.schema == pa.schema([(c, pa.string() if c in PSEUDONYMISED else source.schema.field(c).type)
                                             for c in COLUMNS])
        bad = sum(got.column(c).to_pylist() != source.column(c).to_pylist() for c in ("id", "visit_date", "ward"))
        for column in PSEUDONYMISED:
            want = [pseudonym(self.key, v) for v in source.column(column).to_pylist()]
            bad += sum(a != b for a, b in zip(got.column(column).to_pylist(), want, strict=True))
        self.check("Parquet CLI equals docs/design.md §4 (stdlib hmac), other columns' types kept", schema_ok and bad == 0,
                   f"{got.num_rows:,} rows, {bad} values differ, schema {'kept' if schema_ok else 'CHANGED'}")


def table(results: dict[str, Run], repeat: int, runs: dict[str, list[Run]]) -> list[str]:
    copy = results.get("file-copy")
    lines = ["| file case | rows | seconds (range) | rows/s | vs CSV copy-through | CPU s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in results.items():
        spread = (f" ({min(x.seconds for x in runs[key]):.2f}–{max(x.seconds for x in runs[key]):.2f})"
                  if len(runs[key]) > 1 else "")
        ratio = f"{(r.rows / r.seconds) / (copy.rows / copy.seconds):.2f}" if copy else "-"  # rows/s: sizes may differ
        lines.append(f"| {CASES[key]} | {r.rows:,} | {r.seconds:.2f}{spread} | {r.rows / r.seconds:,.0f} | {ratio} | "
                     f"{r.cpu:.1f} | {r.peak_rss_mib:.0f} |")
    return lines


def run_all(work: Path, rows: int, repeat: int, token: str, jwks: str, key: bytes, skip: set[str],
            check: Callable[[str, bool, str], None], presidio_rows: int | None = None
            ) -> tuple[list[str], dict[str, Run]]:
    """Every file case ``repeat`` times, interleaved; the medians, checked. Returns the table's lines.
    Presidio runs on its own file of ``presidio_rows`` rows (default: ``rows``)."""
    bench = FileBench(work, rows, token, jwks, key, skip, check, presidio_rows)
    bench.setup()
    runs: dict[str, list[Run]] = {}
    slow = {"file-presidio", "file-hmac"}  # minutes at 1M rows: once
    for rep in range(1, repeat + 1):
        for case in bench.cases():
            if case in slow and rep > 1:
                continue
            runs.setdefault(case, []).append(bench.run(case, rep))
    results = {case: sorted(r, key=lambda x: x.seconds)[(len(r) - 1) // 2] for case, r in runs.items()}
    print("\nfile checks", flush=True)
    for case in results:
        bench.verify(case)
    return table(results, repeat, runs), results


def summary(results: dict[str, Run]) -> list[tuple[str, float, str, bool]]:
    """The file target: the CLI at 35 % or more of pyarrow's CSV copy-through."""
    if "file-copy" not in results or "file-cli" not in results:
        return []
    ratio = results["file-copy"].seconds / results["file-cli"].seconds
    return [("file CLI rows/s / CSV copy-through rows/s", ratio, ">= 0.35", ratio >= 0.35)]
