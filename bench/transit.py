"""Transit custody against the local key: values per second, OpenBao dev server on loopback.

    .venv/bin/python bench/transit.py [--values 200000]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

import hvac

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pseudonymise.core.issuer import DirectoryStore, Issuer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.pseudonymiser import Pseudonymiser
from pseudonymise.core.tokens import verify_token
from pseudonymise.core.transit import MAX_ITEMS, TransitMac

from scripts.services import start_openbao


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=int, default=200_000)
    args = parser.parse_args()
    bao = start_openbao()
    try:
        client = hvac.Client(url=bao.addr, token=bao.token)
        client.sys.enable_secrets_engine("transit", path="transit")
        issuer = Issuer.init(DirectoryStore(Path(tempfile.mkdtemp()) / "store"), "bench")
        issuer.transit_client = client
        issuer.create_project("local")
        issuer.create_project("vault", custody="transit")
        values = [f"P{secrets.randbelow(10**9):09d}" for _ in range(args.values)]
        policy = ColumnPolicy.pseudonymise("id")
        for project in ("local", "vault"):
            token = verify_token(issuer.issue(project, "pseudonymisation"), issuer.public_keys())
            mac = TransitMac(client, "transit", "pseudonymise-vault", token.key_version) if token.key_ref else None
            pz = Pseudonymiser(token, policy, mac)
            t0 = time.perf_counter()
            for i in range(0, len(values), 50_000):
                pz.pseudonymise_batch({"id": values[i:i + 50_000]})
            dt = time.perf_counter() - t0
            extra = f", {mac.requests} requests of up to {MAX_ITEMS} values" if mac else ""
            print(f"{project + ' key':<10} {len(values) / dt:>10,.0f} values/s ({dt:.2f} s{extra})")
    finally:
        bao.stop()


if __name__ == "__main__":
    main()
