"""Micro-benchmark of the core engine: values per second for one million values.

    .venv/bin/python bench/micro.py [--values 1000000]

Deterministic, randomised and reversible (pseudonymise + seal into SQLite escrow) treatments,
and secondary pseudonymisation, all through the same batch API the operators use.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from pseudonymise.core.escrow import EscrowTables, EscrowWriter
from pseudonymise.core.issuer import DirectoryStore, Issuer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.pseudonymiser import Pseudonymiser, SecondaryPseudonymiser
from pseudonymise.core.tokens import verify_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=50_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pseudonymise-micro-"))
    issuer = Issuer.init(DirectoryStore(work / "store"), "bench")
    issuer.create_project("det", method="irreversible")
    issuer.create_project("rnd", method="irreversible", treatment="randomised")
    issuer.create_project("rev", method="reversible", retention=timedelta(days=30))
    issuer.create_project("sec", method="irreversible")
    keys = issuer.public_keys()
    values = [f"P{i:09d}" for i in range(args.values)]
    policy = ColumnPolicy.pseudonymise("id")
    print(f"{args.values:,} distinct text identifiers, batches of {args.batch:,}")

    def run(name: str, project: str, escrow: bool = False) -> list[str]:
        token = verify_token(issuer.issue(project, "pseudonymisation"), keys)
        pz = Pseudonymiser(token, policy)
        engine = sa.create_engine(f"sqlite:///{work / (name + '.db')}")
        tables = EscrowTables.define(sa.MetaData())
        tables.batches.metadata.create_all(engine)
        writer = EscrowWriter(token, tables) if escrow else None
        out: list[str] = []
        t0 = time.perf_counter()
        with engine.begin() as conn:
            for i in range(0, len(values), args.batch):
                batch = pz.pseudonymise_batch({"id": values[i:i + args.batch]})
                if writer is not None:
                    writer.write(conn, batch.escrow)
                out.extend(batch.columns["id"])
        dt = time.perf_counter() - t0
        print(f"  {name:<28} {len(values) / dt:>12,.0f} values/s  ({dt:.2f} s)")
        return out

    first = run("deterministic", "det")
    run("randomised", "rnd")
    run("reversible (+ sealed escrow)", "rev", escrow=True)
    sec = SecondaryPseudonymiser(verify_token(issuer.issue("sec", "secondary", source_project="det"), keys), policy)
    t0 = time.perf_counter()
    for i in range(0, len(first), args.batch):
        sec.pseudonymise_batch({"id": first[i:i + args.batch]})
    dt = time.perf_counter() - t0
    print(f"  {'secondary':<28} {len(first) / dt:>12,.0f} values/s  ({dt:.2f} s)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
