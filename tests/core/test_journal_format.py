"""The journal's one-pass decision record is byte for byte the generic canonical record."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from keybroker.core import journal as jf
from keybroker.core.decision import Decision, Outcome

KEY = bytes(range(32))

text = st.text(max_size=40)  # any code point: quotes, backslashes, control characters, emoji
optional = st.none() | text


@st.composite
def decisions(draw: st.DrawFn) -> Decision:
    return Decision(
        service=draw(text),
        operation=draw(text),
        outcome=draw(st.sampled_from(list(Outcome))),
        reason=draw(text),
        status_code=draw(text),
        subject=draw(optional),
        token_id=draw(optional),
        client_id=draw(optional),
        cert_thumbprint=draw(optional),
        cert_identity=draw(optional),
        peer_address=draw(optional),
        recording_id=draw(optional),
        purposes=tuple(draw(st.lists(text, max_size=4))),
        subject_ids=tuple(draw(st.lists(text, max_size=4))),
        key_name=draw(optional),
        key_version=draw(st.none() | st.integers(min_value=0, max_value=2**40)),
        started_ns=draw(st.integers(min_value=0, max_value=2**63)),
        ended_ns=draw(st.integers(min_value=0, max_value=2**63)),
        reference=draw(optional),
        justification=draw(optional),
        purposes_added=tuple(draw(st.lists(text, max_size=3))),
        purposes_removed=tuple(draw(st.lists(text, max_size=3))),
        trace_context=draw(st.dictionaries(text, text, max_size=3)),
    )


@given(
    decision=decisions(),
    seq=st.integers(min_value=1, max_value=2**62),
    ts=st.integers(min_value=0, max_value=2**63),
    prev=st.just(jf.GENESIS) | st.binary(min_size=32, max_size=32).map(bytes.hex),
)
def test_one_pass_record_equals_the_generic_seal(
    decision: Decision, seq: int, ts: int, prev: str
) -> None:
    """Same MAC and same line as seal(): records written by the fast path verify like any other."""
    fast = jf.decision_record(KEY, seq=seq, ts=ts, prev=prev, decision=decision)
    generic = jf.seal(
        KEY,
        seq=seq,
        ts=ts,
        prev=prev,
        kind=jf.KIND_DECISION,
        payload={"d": jf.decision_to_dict(decision)},
    )
    assert fast.mac == generic.mac
    assert fast.line() == generic.line()
    assert fast.body == generic.body


def test_a_fast_record_verifies_and_chains() -> None:
    """Two fast records form a chain that verify() accepts."""
    first = jf.decision_record(
        KEY, seq=1, ts=5, prev=jf.GENESIS, decision=Decision(service="s", operation="o")
    )
    second = jf.decision_record(
        KEY, seq=2, ts=6, prev=first.mac, decision=Decision(service="s", operation='é"\\')
    )
    records = list(jf.verify(KEY, [("a:1", first.line()), ("a:2", second.line())]))
    assert [r.seq for r in records] == [1, 2]
    assert records[1].prev == first.mac
