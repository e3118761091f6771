"""The real services the suite relies on start and answer (a failure here explains later ones)."""

import hvac
import sqlalchemy as sa


def test_postgres_answers(pg_url: str) -> None:
    with sa.create_engine(pg_url).connect() as conn:
        assert conn.execute(sa.text("SELECT 1 + 1")).scalar_one() == 2


def test_openbao_kv_v2_round_trip(openbao) -> None:
    client = hvac.Client(url=openbao.addr, token=openbao.token)
    client.secrets.kv.v2.create_or_update_secret(path="probe", secret={"value": "x"}, mount_point="secret")
    assert client.secrets.kv.v2.read_secret_version(path="probe", mount_point="secret")["data"]["data"] == {"value": "x"}
