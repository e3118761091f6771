"""The real services the suite relies on (``scripts/services.py``) start and answer (a failure here
explains later ones)."""

from __future__ import annotations

import hvac
import pytest
import sqlalchemy as sa

from scripts.services import OpenBaoServer, RestartableOpenBao, free_port


def test_free_ports_are_free_and_distinct() -> None:
    ports = {free_port() for _ in range(5)}
    assert len(ports) == 5 and all(1024 <= p < 65536 for p in ports)


@pytest.mark.postgres
def test_postgres_answers(pg_url: str) -> None:
    with sa.create_engine(pg_url).connect() as conn:
        assert conn.execute(sa.text("SELECT 1 + 1")).scalar_one() == 2


@pytest.mark.vault
def test_openbao_kv_v2_round_trip(openbao: OpenBaoServer) -> None:
    client = hvac.Client(url=openbao.addr, token=openbao.token)
    client.secrets.kv.v2.create_or_update_secret(path="probe", secret={"value": "x"}, mount_point="secret")
    assert client.secrets.kv.v2.read_secret_version(path="probe", mount_point="secret", raise_on_deleted_version=True)["data"]["data"] == {"value": "x"}


@pytest.mark.slow
@pytest.mark.vault
def test_restartable_openbao_keeps_its_secrets_across_a_restart() -> None:
    bao = RestartableOpenBao()
    try:
        bao.start()
        bao.client().secrets.kv.v2.create_or_update_secret(path="probe", secret={"value": "kept"},
                                                           mount_point="secret")
        addr, token = bao.addr, bao.token
        bao.stop()
        bao.start()
        assert (bao.addr, bao.token) == (addr, token)
        read = bao.client().secrets.kv.v2.read_secret_version(path="probe", mount_point="secret", raise_on_deleted_version=True)
        assert read["data"]["data"] == {"value": "kept"}
    finally:
        bao.remove()
