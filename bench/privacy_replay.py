"""Privacy replay at start-up: how long verifying a journal takes, the first time and after.

    .venv/bin/python bench/privacy_replay.py [--records N] [--privacy P]

Issue #15 item 8: a broker verifies every chain of its journal before it serves, to re-apply
the privacy changes a restored metadata database lacks (keybroker.adapters.privacy_journal). A
journal of N typical UnwrapDataKey records (~750 bytes each) with P erasures among them is
written with the journal's own record writer into one chain; the script reports the CPU and wall
time of the first replay read (everything verified) and of the second (only what was written
since: nothing), best of three.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from keybroker.adapters.privacy_journal import VERIFIED, privacy_decisions
from keybroker.core import journal as jf
from keybroker.core.decision import Decision, Outcome


def write_journal(root: Path, key: bytes, records: int, privacy: int) -> None:
    chain = root / "w0"
    chain.mkdir(parents=True)
    every = max(1, records // max(1, privacy))
    prev, lines = jf.GENESIS, []
    for seq in range(1, records + 1):
        now = time.time_ns()
        if privacy and seq % every == 0:
            d = Decision(
                service="keybroker.v1.Privacy",
                operation="EraseRecording",
                outcome=Outcome.ALLOW,
                reason="ok",
                subject="dpo-1",
                recording_id=f"rec-{seq:010d}",
                justification="art. 17 request",
                started_ns=now,
            )
        else:
            d = Decision(
                service="keybroker.v1.KeyBroker",
                operation="UnwrapDataKey",
                outcome=Outcome.ALLOW,
                reason="ok",
                status_code="OK",
                subject="storage-eu-1",
                token_id="4b0c" * 8,
                client_id="storage",
                cert_identity="spiffe://corp/storage/eu-1",
                cert_thumbprint="Qm9" * 14,
                peer_address="ipv4:10.0.3.7:50122",
                recording_id=f"rec-{seq:010d}",
                purposes=("support",),
                subject_ids=("p:9c1abc",),
                key_name="recordings",
                key_version=1,
                started_ns=now,
                ended_ns=now,
            )
        prev, line = jf.decision_line(key, seq=seq, ts=now, prev=prev, decision=d)
        lines.append(line)
    (chain / "journal-000000000001.jsonl").write_bytes(b"".join(lines))


def timed(root: Path, key: bytes) -> tuple[float, float, int]:
    cpu, wall = time.process_time(), time.perf_counter()
    found = privacy_decisions(root, key)
    return time.process_time() - cpu, time.perf_counter() - wall, len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--privacy", type=int, default=100)
    args = parser.parse_args()
    key = os.urandom(32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_journal(root, key, args.records, args.privacy)
        size = (root / "w0" / "journal-000000000001.jsonl").stat().st_size
        first, again = [], []
        for _ in range(3):
            (root / VERIFIED).unlink(missing_ok=True)
            first.append(timed(root, key))
            again.append(timed(root, key))
        cpu, wall, found = min(first)
        print(
            f"{args.records} records ({size / 1e6:.0f} MB), {found} privacy records: first read "
            f"{cpu:.2f} s CPU ({cpu / args.records * 1e6:.1f} µs/record), {wall:.2f} s wall"
        )
        cpu, wall, found = min(again)
        print(f"next start: {cpu * 1e3:.1f} ms CPU, {wall * 1e3:.1f} ms wall, {found} records")


if __name__ == "__main__":
    main()
