"""Bytes per decision, for docs/CAPACITY.md: journal, OTLP export and PostgreSQL registry.

    .venv/bin/python bench/deploy_volume.py [--calls N]

Starts a broker in this process (fresh dev environment: SoftHSM, dev PKI and issuer) on a
throwaway PostgreSQL cluster (tests/support/postgres.py), makes N GenerateDataKey calls (each a
new recording with one data subject and one purpose, as a call centre would) and N
UnwrapDataKey calls over real mTLS, then reports:

- journal bytes per decision (the files under [audit] dir / records in them; checkpoints
  included), and how many records one fdatasync covered is not measured here (see PERFORMANCE);
- OTLP bytes per exported decision span (the journal's records encoded as the exporter sends
  them: an ExportTraceServiceRequest protobuf, uncompressed, batches of 256);
- PostgreSQL bytes per registered recording (pg_total_relation_size of the registry tables,
  indexes included, divided by the recordings).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402

from keybroker import settings as settings_mod  # noqa: E402
from keybroker.adapters.export import record_to_span  # noqa: E402
from keybroker.adapters.journal import read_lines  # noqa: E402
from keybroker.core import journal as jf  # noqa: E402
from keybroker.devenv import mint_token, provision  # noqa: E402
from keybroker.server.app import create_server  # noqa: E402
from keybroker.v1 import keybroker_pb2 as pb  # noqa: E402
from tests.support.clients import auth, channel, generate_request, stub  # noqa: E402
from tests.support.postgres import LocalPostgres  # noqa: E402

REGISTRY = ("kb_recordings", "kb_recording_subjects")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kb-volume-"))
    env = provision(work / "state", listen="127.0.0.1:0")
    with LocalPostgres() as pg:
        journal = work / "journal"
        environ = {
            "KEYBROKER_SERVER_LISTEN": "127.0.0.1:0",
            "KEYBROKER_STATE_URL": pg.url(),
            "KEYBROKER_AUDIT_DIR": str(journal),
            "KEYBROKER_TELEMETRY_SPAN_FILE": "",
        }
        running = create_server(settings_mod.load(env.config, environ=environ))
        token = mint_token(env, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
        started = time.perf_counter()
        with channel(env, running.port) as ch:
            kb = stub(ch)
            for _ in range(args.calls):
                rec = f"call-{uuid.uuid4()}"
                made = kb.GenerateDataKey(
                    generate_request(rec, subject_ids=[f"cust-{uuid.uuid4().hex[:12]}"]),
                    metadata=auth(token),
                )
                kb.UnwrapDataKey(
                    pb.UnwrapDataKeyRequest(
                        recording_id=rec, wrapped_key=made.wrapped_key, purpose="support"
                    ),
                    metadata=auth(token),
                )
        elapsed = time.perf_counter() - started
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            ).fetchone()
            connections = row[0] if row else 0
        running.stop(1)  # flushes the registry and writes the final checkpoint
        files = sorted(journal.glob("w*/journal-*.jsonl"))
        size = sum(f.stat().st_size for f in files)  # cut back to the last record on stop
        records = []
        for chain in sorted(journal.glob("w*")):
            for _, raw in read_lines(chain):
                body = jf.parse_line(raw)
                mac = str(body.pop("mac"))
                records.append(jf.Record(int(body["seq"]), int(body["ts"]), str(body["kind"]),
                                         body, str(body["prev"]), mac))  # fmt: skip
        decisions = [r for r in records if r.decision is not None]
        spans = [record_to_span(r, "w0", Resource.create({"service.name": "keybroker"}))
                 for r in records]  # fmt: skip
        batches = [spans[i : i + 256] for i in range(0, len(spans), 256)]
        encoded = [encode_spans(b).SerializeToString() for b in batches]
        otlp = sum(len(e) for e in encoded)
        otlp_gzip = sum(len(gzip.compress(e)) for e in encoded)
        by_operation: dict[str, list[int]] = {}
        for r in records:
            name = r.decision.operation if r.decision is not None else "checkpoint"
            by_operation.setdefault(name, []).append(len(r.line()))
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            registry = sum(
                conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0]  # type: ignore[index]
                for t in REGISTRY
            )
            recordings = conn.execute("SELECT count(*) FROM kb_recordings").fetchone()[0]  # type: ignore[index]
    print(f"PostgreSQL connections held by one broker process: {connections}")
    print(
        f"{args.calls} generate + {args.calls} unwrap in {elapsed:.1f} s (one client, sequential)"
    )
    print(f"journal: {size} bytes, {len(records)} records ({len(decisions)} decisions): "
          f"{size / len(records):.0f} bytes per record")  # fmt: skip
    for name, sizes in sorted(by_operation.items()):
        print(f"  {name}: {len(sizes)} records, {sum(sizes) / len(sizes):.0f} bytes each")
    print(f"OTLP: {otlp} bytes in {len(batches)} requests: {otlp / len(spans):.0f} bytes per span"
          f" ({otlp_gzip / len(spans):.0f} with gzip)")  # fmt: skip
    print(f"PostgreSQL registry: {registry} bytes for {recordings} recordings: "
          f"{registry / recordings:.0f} bytes per recording (indexes included)")  # fmt: skip


if __name__ == "__main__":
    main()
