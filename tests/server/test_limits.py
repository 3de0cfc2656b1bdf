"""The journal cannot be flooded (issue 14, item 8): per-caller rate limits on the data plane,
and denials beyond a per-minute threshold journaled as aggregate records, every one counted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from keybroker.adapters.audit_reader import decisions
from keybroker.core.decision import Decision, Outcome
from keybroker.devenv import DevEnv, mint_token
from keybroker.server.app import RunningBroker, create_server
from keybroker.server.limits import AGGREGATE_REASON, DenialLimiter, RateLimits, TokenBuckets
from keybroker.server.status import REASON_METADATA
from tests.conftest import load_settings
from tests.support.clients import auth, channel, generate_request, stub


def _start(devenv: DevEnv, tmp_path: Path, **limits: str) -> RunningBroker:
    return create_server(
        load_settings(
            devenv,
            state_url=f"sqlite:{tmp_path / 'kb.db'}",
            audit_dir=str(tmp_path / "journal"),
            **{f"limits_{k}": v for k, v in limits.items()},
        )
    )


@pytest.fixture
def limited(devenv: DevEnv, tmp_path: Path) -> Iterator[RunningBroker]:
    """A broker allowing 5 calls/s per certificate and 3/s per token subject, burst 1 s."""
    running = _start(devenv, tmp_path, certificate_rate="5", subject_rate="3", burst="1")
    yield running
    running.stop(1)


def _outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        err: Any = exc
        return err.code(), str(dict(err.trailing_metadata() or ()).get(REASON_METADATA, ""))
    return grpc.StatusCode.OK, ""


def _journal(tmp_path: Path) -> list[Decision]:
    return [d for _ts, d in decisions(tmp_path / "journal")]


def test_a_caller_over_its_rate_is_refused_and_recorded(
    devenv: DevEnv, limited: RunningBroker, tmp_path: Path
) -> None:
    """Per token subject: 3 calls in a burst, the 4th RESOURCE_EXHAUSTED ``rate_limited``, and
    the refusal is in the journal with its caller. Another subject is not held up."""
    token = mint_token(devenv, scopes=["keys:generate"], purposes=["support"], subject="busy")
    other = mint_token(devenv, scopes=["keys:generate"], purposes=["support"], subject="calm")
    with channel(devenv, limited.port) as ch:
        kb = stub(ch)
        results = [
            _outcome(
                lambda i=i: kb.GenerateDataKey(generate_request(f"r-{i}"), metadata=auth(token))
            )
            for i in range(4)
        ]
        assert [code for code, _ in results[:3]] == [grpc.StatusCode.OK] * 3
        assert results[3] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited")
        assert _outcome(
            lambda: kb.GenerateDataKey(generate_request("r-calm"), metadata=auth(other))
        ) == (grpc.StatusCode.OK, "")
    limited.stop(1)
    refused = [d for d in _journal(tmp_path) if d.reason == "rate_limited"]
    assert len(refused) == 1
    assert (refused[0].outcome, refused[0].subject, refused[0].recording_id) == (
        Outcome.DENY,
        "busy",
        "r-3",
    )
    assert refused[0].status_code == "RESOURCE_EXHAUSTED"


def test_the_certificate_rate_holds_across_token_subjects(
    devenv: DevEnv, limited: RunningBroker
) -> None:
    """Per client certificate: 5 calls in a burst whatever the tokens, then refused (before
    the token is even verified)."""
    with channel(devenv, limited.port) as ch:
        kb = stub(ch)
        codes = []
        for i in range(7):
            token = mint_token(
                devenv, scopes=["keys:generate"], purposes=["support"], subject=f"s{i}"
            )
            codes.append(
                _outcome(
                    lambda t=token, i=i: kb.GenerateDataKey(
                        generate_request(f"c-{i}"), metadata=auth(t)
                    )
                )[0]
            )
    assert codes[:5] == [grpc.StatusCode.OK] * 5
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[5:]


def test_denials_beyond_the_threshold_are_one_aggregate_record_and_all_counted(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """60 denied calls from one certificate with a threshold of 5 a minute: 5 records of their
    own, then one aggregate record standing for the other 55, naming caller and reasons."""
    running = _start(devenv, tmp_path, denials_per_minute="5")
    try:
        bad = mint_token(devenv, scopes=["keys:unwrap"], purposes=["support"])  # no generate
        with channel(devenv, running.port) as ch:
            kb = stub(ch)
            for i in range(40):
                assert _outcome(lambda i=i: kb.GenerateDataKey(generate_request(f"d-{i}")))[0] == (
                    grpc.StatusCode.UNAUTHENTICATED
                )
            for i in range(20):
                assert (
                    _outcome(
                        lambda i=i: kb.GenerateDataKey(
                            generate_request(f"s-{i}"), metadata=auth(bad)
                        )
                    )[0]
                    == grpc.StatusCode.PERMISSION_DENIED
                )
    finally:
        running.stop(1)
    records = [d for d in _journal(tmp_path) if d.outcome is Outcome.DENY]
    single = [d for d in records if d.reason != AGGREGATE_REASON]
    [aggregate] = [d for d in records if d.reason == AGGREGATE_REASON]
    assert len(single) == 5
    assert aggregate.aggregated == {
        "GenerateDataKey/token_missing": 35,
        "GenerateDataKey/scope_missing": 20,
    }
    assert len(single) + sum(aggregate.aggregated.values()) == 60  # every denial, once
    assert aggregate.cert_identity == "spiffe://keybroker.dev/storage/dev"
    assert aggregate.reference is not None
    assert aggregate.reference.startswith("55 denials from spiffe://keybroker.dev/storage/dev")
    assert "token_missing 35, scope_missing 20" in aggregate.reference


def test_aggregates_close_with_their_minute_and_fall_back_to_the_ip() -> None:
    """A caller without a certificate is aggregated per IP; a window's aggregate is emitted
    once its minute is over, and the next minute starts with records of their own again."""
    now = [0.0]
    emitted: list[Decision] = []
    limiter = DenialLimiter(2, emitted.append, clock=lambda: now[0])

    def denial(peer: str = "ipv4:10.1.2.3:4000") -> Decision:
        return Decision("keybroker.v1.KeyBroker", "UnwrapDataKey", Outcome.DENY, "token_missing",
                        peer_address=peer, ended_ns=1)  # fmt: skip

    assert [limiter.admit(denial()) for _ in range(5)] == [True, True, False, False, False]
    assert limiter.admit(Decision("s", "op", Outcome.ALLOW))  # allows are never limited
    assert limiter.flush() == []  # the minute is not over
    now[0] = 61.0
    assert limiter.admit(denial())  # a new minute
    [record] = limiter.flush()
    assert record is emitted[0]
    assert (record.peer_address, record.aggregated) == (
        "10.1.2.3",
        {"UnwrapDataKey/token_missing": 3},
    )
    assert limiter.admit(denial("ipv6:[::1]:5"))  # another IP has its own threshold


def test_token_buckets_refill_at_their_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(2.0, 2.0, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [True, True, False]
    assert buckets.take("b")
    now[0] = 0.5
    assert buckets.take("a") and not buckets.take("a")


def test_rate_limits_are_off_by_default(devenv: DevEnv) -> None:
    """The defaults never throttle (the benchmarks drive ~10k calls/s from one identity)."""
    limits = load_settings(devenv).limits
    assert RateLimits.of(limits.certificate_rate, limits.subject_rate, limits.burst) is None
