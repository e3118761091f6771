"""Awkward identifiers through the whole engine (pseudonymise, escrow, reverse), and a fuzzing run
over the CSV reader: only the plugin's own errors may come out of it."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pseudonymise.core.errors import DataIOError, InvalidTextError, UnsupportedTypeError
from pseudonymise.core.escrow import EscrowTables, EscrowWriter, reveal
from pseudonymise.core.files import CsvSource
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.pseudonymiser import Pseudonymiser
from pseudonymise.core.tokens import verify_token

HUGE = "P" + "x" * (10 * 1024 * 1024)  # a 10 MB identifier


def _pz(issuer: Issuer, project: str = "research-a") -> Pseudonymiser:
    token = verify_token(issuer.issue(project, "pseudonymisation"), issuer.public_keys())
    return Pseudonymiser(token, ColumnPolicy.pseudonymise("id"))


def test_awkward_values_round_trip_through_escrow(issuer: Issuer, sqlite_url: str) -> None:
    values = [None, "", " ", "\t\n", HUGE, "naïve", "123", 123, "Zoë" + "\u0301"]
    pz = _pz(issuer)
    batch = pz.pseudonymise_batch({"id": values})
    out = batch.columns["id"]
    assert out[0] is None and batch.stats.nulls == 1
    assert len(set(out[1:])) == len(values) - 2  # "123" and 123 share one pseudonym; all others differ
    assert out[6] == out[7]
    assert all(len(p) == 26 for p in out[1:])
    engine = sa.create_engine(sqlite_url)
    tables = EscrowTables.define(sa.MetaData())
    tables.batches.metadata.create_all(engine)
    writer = EscrowWriter(pz.token, tables)
    with engine.begin() as conn:
        writer.write(conn, batch.escrow)
    reverse = verify_token(issuer.issue("research-a", "reverse"), issuer.public_keys())
    with engine.connect() as conn:  # the digests, as the run's audited success row would list them
        revealed = reveal(conn, tables, reverse, out[1:], lambda: writer.digests).values
    assert revealed[out[4]] == HUGE
    assert revealed[out[1]] == "" and revealed[out[2]] == " "


def test_unicode_normal_forms_give_one_pseudonym(issuer: Issuer) -> None:
    name = "Chloé Müller-Ångström"
    forms = [unicodedata.normalize(f, name) for f in ("NFC", "NFD")]
    assert forms[0] != forms[1]
    out = _pz(issuer).pseudonymise_batch({"id": forms}).columns["id"]
    assert out[0] == out[1]


def test_lone_surrogates_and_floats_are_refused_by_name(issuer: Issuer) -> None:
    with pytest.raises(InvalidTextError, match="'id'"):
        _pz(issuer).pseudonymise_batch({"id": ["ok", "bad\udcff"]})
    with pytest.raises(UnsupportedTypeError, match=r"'id'.*floating-point"):
        _pz(issuer).pseudonymise_batch({"id": [1.5]})


FUZZ_RUNS = 500


@settings(max_examples=FUZZ_RUNS, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400) | st.text(alphabet='a,"\r\n\ufeff\\é;', max_size=200).map(str.encode))
def test_fuzz_csv_reader_only_raises_its_own_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.csv"
    path.write_bytes(data)
    try:
        source = CsvSource(path, batch_size=7)
        width = len(source.columns)
        for batch in source.batches():
            assert all(len(col) == len(next(iter(batch.values()))) for col in batch.values())
            assert len(batch) == width
    except (DataIOError, InvalidTextError):
        pass
