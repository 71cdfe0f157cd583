"""Property-based fuzzing of the broker core (bounded, runs in CI): whatever arrives, the
core never raises, every reply it produces can be encoded, and its books stay consistent.
`fuzz/fuzz_core.py` runs the same target under atheris for longer hunts."""

from __future__ import annotations

import json

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mangogram_broker.clock import Clock
from mangogram_broker.core import BrokerCore
from mangogram_broker.store import MemoryStore
from mangogram_proto import codec
from mangogram_proto.constants import SIGNATURE, SIGNATURE_V2
from mangogram_proto.messages import BROKER_COMMANDS, CLIENT_COMMANDS

from .harness import T0, TEST_LIMITS

FIELD_NAMES = sorted(
    {f.name for cls in CLIENT_COMMANDS + BROKER_COMMANDS for f in msgspec.structs.fields(cls)}
)
COMMANDS = [c.COMMAND.encode() for c in CLIENT_COMMANDS + BROKER_COMMANDS] + [b"", b"NOPE"]
PEERS = [b"\x00" + i.to_bytes(4, "big") for i in range(1, 4)] + [b"chosen-id"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.sampled_from(["1", "²", "alice", "bob", "Олена", "9" * 30, ""])
)
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=6,
)
bodies = st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=6)


def encode_body(body: dict) -> bytes:
    # json.dumps keeps lone surrogates as \\ud800 escapes: hostile but valid JSON.
    return json.dumps(body).encode()


frames = st.one_of(
    st.tuples(st.sampled_from(COMMANDS), bodies).map(
        lambda cb: [SIGNATURE_V2, cb[0], encode_body(cb[1])]
    ),
    st.tuples(st.sampled_from(COMMANDS), bodies).map(
        lambda cb: [SIGNATURE + cb[0] + b" " + encode_body(cb[1])]
    ),
    st.lists(st.binary(max_size=30), max_size=5),
    st.binary(max_size=40).map(lambda b: [SIGNATURE + b]),
)
logins = st.sampled_from(["alice", "bob", "Олена", "ОЛЕНА"]).flatmap(
    lambda n: st.sampled_from(
        [
            [SIGNATURE_V2, b"LOGIN", json.dumps({"name": n}).encode()],
            [SIGNATURE + b"LOGIN " + json.dumps({"name": n}).encode()],
        ]
    )
)
steps = st.lists(
    st.tuples(
        st.sampled_from(PEERS), st.one_of(frames, logins), st.sampled_from([None, "k1", "k2"])
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps, require_keys=st.booleans())
def test_core_survives_any_input_and_keeps_its_books(steps, require_keys):
    core = BrokerCore(TEST_LIMITS, store=MemoryStore(), require_keys=require_keys)
    now = Clock(T0, 0)
    for peer, message, key in steps:
        now = Clock(now.wall + 7, now.mono + 7)
        for out in core.handle_frames(peer, message, now, key, "127.0.0.1"):
            codec.encode(out.message)  # every reply must be sendable, in both framings
            codec.encode(out.message, 2)
        if now.wall % 5 == 0:
            core.expire(now)
            core.disconnected(peer, now)
    for session in core.registry:
        assert core.registry.by_key(session.key) is session
        assert core.registry.by_peer(session.peer) is session
