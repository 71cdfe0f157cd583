"""Normative statements of docs/protocol.md that had no test behind them, checked against
the broker core directly (raw client messages in, broker messages out, a fixed clock),
and the two that depend on the shell against the real broker."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import zmq

from mangogram_broker.core import BrokerCore, Clock, Outgoing, coalesce
from mangogram_broker.store import MemoryStore
from mangogram_proto import codec
from mangogram_proto.constants import SIGNATURE_V2
from mangogram_proto.errors import ErrorCode, RemoteProtocolError
from mangogram_proto.messages import (
    Accepted,
    Deliver,
    Error,
    Goodbye,
    History,
    HistoryPage,
    Leave,
    Limits,
    Login,
    Online,
    Ping,
    Pong,
    Presence,
    Read,
    Receipt,
    Seen,
    Send,
    Welcome,
    Who,
)

from .conftest import dealer
from .harness import T0, TEST_LIMITS

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_MD = ROOT / "docs" / "protocol.md"


class Wire:
    """The core with hand-made peers; every call commits the store as the shell does."""

    def __init__(self, limits: Limits = TEST_LIMITS) -> None:
        self.core = BrokerCore(limits, store=MemoryStore())
        self.now = T0
        self._next = 1

    @property
    def clock(self) -> Clock:
        """Both of the core's clocks; here they move together."""
        return Clock(self.now, self.now)

    def peer(self) -> bytes:
        self._next += 1
        return b"\x00" + self._next.to_bytes(4, "big")

    def say(self, peer: bytes, message) -> list[Outgoing]:
        return self.frames(peer, codec.encode(message))

    def frames(self, peer: bytes, frames: list[bytes]) -> list[Outgoing]:
        out = self.core.handle_frames(peer, frames, self.clock)
        self.core.store.commit()
        return out

    def login(self, name: str, **fields) -> tuple[bytes, Welcome]:
        peer = self.peer()
        out = self.say(peer, Login(name, **fields))
        welcome = out[0].message
        assert isinstance(welcome, Welcome), out
        return peer, welcome


def to(peer: bytes, out: list[Outgoing]) -> list:
    return [o.message for o in out if o.peer == peer]


def codes(peer: bytes, out: list[Outgoing]) -> list[str]:
    return [m.code for m in to(peer, out) if isinstance(m, Error)]


@pytest.fixture
def wire() -> Wire:
    return Wire()


# Section 10: the error code table is the ErrorCode enum, no more, no less.


def test_the_error_code_table_lists_exactly_the_codes_of_the_enum():
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    section = text.split("## 10. Error codes", 1)[1].split("### How `ref` is found", 1)[0]
    table = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert table == {code.value for code in ErrorCode}


# Section 3: versioning.


def test_unsupported_version_is_refused_and_not_mgp_is_malformed(wire):
    """The framing of the answer is the shell's: tests/test_framing_sockets.py."""
    peer = wire.peer()
    (reply,) = wire.frames(peer, [b"MGP01", b"PING", b"{}"])
    assert reply.message.code == ErrorCode.UNSUPPORTED_VERSION
    assert reply.message.message.endswith("this peer speaks MGP03 and MGP02")
    (reply,) = wire.frames(peer, [b"MGP04PING {}"])
    assert reply.message.code == ErrorCode.UNSUPPORTED_VERSION
    (reply,) = wire.frames(peer, [b"XYZ02", b"PING", b"{}"])
    assert reply.message.code == ErrorCode.MALFORMED  # not MGP at all
    (reply,) = wire.frames(peer, [b"XYZ03PING {}"])
    assert reply.message.code == ErrorCode.MALFORMED


def test_both_framings_reach_the_same_core(wire):
    """Section 3: version 2 and version 3 messages mean the same to the broker."""
    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    (v3,) = codec.encode(Send("m1", "bob", "x", 1))
    out = wire.frames(alice, [v3])
    out += wire.frames(alice, codec.encode(Send("m2", "bob", "y", 1), 2))
    assert [m.id for m in to(bob, out)] == ["m1", "m2"]


# Section 4: the state table.


def test_leave_on_an_anonymous_connection_gets_goodbye_and_nothing_else(wire):
    watcher, _ = wire.login("watcher")
    peer = wire.peer()
    out = wire.say(peer, Leave())
    assert [o.message for o in out] == [Goodbye()]
    assert to(watcher, out) == []


def test_every_command_but_login_and_leave_needs_a_session(wire):
    peer = wire.peer()
    for message in (
        Send("m1", "x", "hi", 1),
        Receipt(1),
        Read("1"),
        History("x", 5),
        Who(),
        Ping(),
    ):
        out = wire.say(peer, message)
        assert codes(peer, out) == ["not_logged_in"], message
    (error,) = to(peer, wire.say(peer, Send("m1", "x", "hi", 1)))
    assert error.ref == "m1"


def test_leave_ends_the_session_tells_the_others_and_allows_another_login(wire):
    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    out = wire.say(bob, Leave())
    assert to(bob, out) == [Goodbye()]
    assert to(alice, out) == [Presence("bob", "left", wire.now)]
    assert codes(bob, wire.say(bob, Ping())) == ["not_logged_in"]
    out = wire.say(bob, Login("carol"))  # the connection stays open and anonymous
    assert isinstance(to(bob, out)[0], Welcome)


def test_an_anonymous_connection_is_never_timed_out(wire):
    peer = wire.peer()
    wire.say(peer, Ping())  # the broker has seen it
    wire.now += 100 * TEST_LIMITS.heartbeat_timeout_ms
    assert wire.core.expire(wire.clock) == []
    out = wire.say(peer, Login("late"))
    assert isinstance(to(peer, out)[0], Welcome)


def test_receipt_and_read_are_never_answered(wire):
    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    (deliver,) = to(bob, wire.say(alice, Send("m1", "bob", "hi", 1)))
    assert to(bob, wire.say(bob, Receipt(deliver.seq))) == []
    assert to(bob, wire.say(bob, Read(deliver.broker_id))) == []


# Section 4: logging in and resuming.


def test_a_takeover_is_silent_keeps_the_new_spelling_and_cuts_off_the_old_connection(wire):
    watcher, _ = wire.login("watcher")
    old, welcome = wire.login("olena")
    new = wire.peer()
    out = wire.say(new, Login("OLENA", resume_token=welcome.resume_token))
    (again,) = to(new, out)
    assert isinstance(again, Welcome) and again.name == "OLENA"
    assert again.resume_token != welcome.resume_token  # the token changes every WELCOME
    assert to(watcher, out) == [] and to(old, out) == []  # nobody is told
    assert codes(old, wire.say(old, Ping())) == ["not_logged_in"]
    (online,) = to(watcher, wire.say(watcher, Who()))
    assert online.users == ("OLENA", "watcher")
    stale = wire.peer()
    assert codes(stale, wire.say(stale, Login("olena", resume_token=welcome.resume_token))) == [
        "name_taken"
    ]


def test_a_token_for_a_name_not_online_is_ignored(wire):
    peer = wire.peer()
    out = wire.say(peer, Login("nobody", resume_token="made-up"))
    assert isinstance(to(peer, out)[0], Welcome)


def test_resume_from_at_or_below_zero_is_ignored_and_beyond_the_end_counts_as_the_end(wire):
    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    wire.say(bob, Leave())
    for i in range(3):
        wire.say(alice, Send(f"n{i}", "bob", f"n{i}", 1))
    for resume_from in (0, -5):
        peer = wire.peer()
        out = wire.say(peer, Login("bob", resume_from=resume_from))
        assert [m.seq for m in to(peer, out) if isinstance(m, Deliver)] == [1, 2, 3]
        wire.say(peer, Leave())
    peer = wire.peer()
    out = wire.say(peer, Login("bob", resume_from=1000))
    assert [m for m in to(peer, out) if isinstance(m, Deliver)] == []
    assert to(peer, out)[0].stream_mark == 3
    wire.say(peer, Send("after", "bob", "to myself", 1))
    out = wire.say(peer, Leave())
    peer = wire.peer()
    out = wire.say(peer, Login("bob"))
    assert [m.seq for m in to(peer, out) if isinstance(m, Deliver)] == [4]


# Section 4: presence lists.


def test_who_includes_you_and_both_lists_are_sorted_by_name_key(wire):
    for name in ("Zoe", "bob", "Édith", "adam"):
        wire.login(name)
    me, welcome = wire.login("Carl")
    assert welcome.online == ("adam", "bob", "Zoe", "Édith")  # casefolded order, not ASCII
    (online,) = to(me, wire.say(me, Who()))
    assert online.users == ("adam", "bob", "Carl", "Zoe", "Édith")


# Section 4: ordering.


def test_the_recipients_deliver_leaves_before_the_senders_accepted(wire):
    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    out = wire.say(alice, Send("m1", "bob", "hi", 1))
    kinds = [(o.peer, type(o.message)) for o in out]
    assert kinds == [(bob, Deliver), (alice, Accepted)]


# Section 2 and 5: SEND checks and idempotent resending.


@pytest.mark.parametrize("recipient", ["", "x" * (4 * TEST_LIMITS.max_name_chars + 1)])
def test_an_empty_or_overlong_to_is_unknown_recipient_with_the_id(wire, recipient):
    alice, _ = wire.login("alice")
    (error,) = to(alice, wire.say(alice, Send("m1", recipient, "hi", 1)))
    assert (error.code, error.ref) == ("unknown_recipient", "m1")


def test_a_stored_id_is_the_same_message_whatever_its_to_and_text(wire):
    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    carol, _ = wire.login("carol")
    first = wire.say(alice, Send("m1", "bob", "original", 1))
    (accepted,) = to(alice, first)
    wire.now += 1000
    out = wire.say(alice, Send("m1", "carol", "changed", 2))
    assert to(alice, out) == [accepted]  # the original broker_id and accepted_at
    assert to(carol, out) == [] and to(bob, out) == []


def test_a_stored_id_is_accepted_again_even_when_the_mailbox_is_full(wire):
    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    wire.say(bob, Leave())
    accepted = []
    for i in range(TEST_LIMITS.max_mailbox):
        wire.now += 300  # under the rate limit
        accepted += to(alice, wire.say(alice, Send(f"m{i}", "bob", "x", 1)))
    wire.now += 300
    assert codes(alice, wire.say(alice, Send("one-more", "bob", "x", 1))) == ["mailbox_full"]
    wire.now += 300
    assert to(alice, wire.say(alice, Send("m0", "bob", "x", 1))) == [accepted[0]]


# Section 5: receipts.


def test_a_receipt_at_or_below_the_mark_changes_nothing(wire):
    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    wire.say(alice, Send("m1", "bob", "x", 1))
    wire.say(alice, Send("m2", "bob", "y", 1))
    (delivered,) = to(alice, wire.say(bob, Receipt(1)))
    assert delivered.ids == ("m1",)
    for seq in (0, 1, -3):
        assert wire.say(bob, Receipt(seq)) == []
    assert wire.core.store.unconfirmed_count("bob") == 1


# Section 5: read receipts.


def test_read_of_an_unknown_foreign_or_already_read_message_is_ignored(wire):
    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    carol, _ = wire.login("carol")
    out = wire.say(alice, Send("m1", "bob", "x", 1))
    (deliver,) = to(bob, out)
    wire.say(bob, Receipt(deliver.seq))
    assert wire.say(carol, Read(deliver.broker_id)) == []  # not addressed to carol
    assert wire.say(bob, Read("999999")) == []  # unknown
    out = wire.say(bob, Read(deliver.broker_id))
    assert [type(m) for m in to(alice, out)] == [Seen]
    assert wire.say(bob, Read(deliver.broker_id)) == []  # already read


# Section 5: history.


def test_history_checks_limit_and_before_and_repeats_the_peer_as_spelled(wire):
    alice, _ = wire.login("alice")
    wire.login("bob")
    for limit in (0, -1):
        assert codes(alice, wire.say(alice, History("bob", limit))) == ["malformed"]
    for before in ("abc", "1.5", "²", "1234567890123456789"):
        out = wire.say(alice, History("bob", 5, before))
        assert codes(alice, out) == ["malformed"], before
    (page,) = to(alice, wire.say(alice, History("BOB", 5)))
    assert isinstance(page, HistoryPage) and page.peer == "BOB"
    (empty,) = to(alice, wire.say(alice, History("never-used", 5)))
    assert (empty.items, empty.more, empty.peer) == ((), False, "never-used")


# Section 5: DELIVER.delayed.


def test_delayed_is_false_live_and_true_after_the_heartbeat_timeout(wire):
    """Not only a login's window: a DELIVER offered again (its first was refused by a
    full queue) more than heartbeat_timeout_ms after acceptance is delayed too."""
    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    out = wire.say(alice, Send("m1", "bob", "x", 1))
    (refused,) = [o for o in out if o.peer == bob]
    assert refused.message.delayed is False
    assert wire.core.send_failed(refused, False, wire.clock) == []  # bob's queue was full
    wire.now += TEST_LIMITS.heartbeat_timeout_ms + 1
    wire.say(bob, Ping())  # bob is alive
    delivers = to(bob, wire.say(alice, Send("m2", "bob", "y", 1)))
    assert [(m.id, m.delayed) for m in delivers] == [("m1", True), ("m2", False)]


# Section 2: the shell keeps at most four frames of a message.


@pytest.mark.sockets
@pytest.mark.parametrize("count", [4, 7, 100])
def test_a_message_of_many_frames_is_reported_as_four(broker, zctx, count):
    sock = dealer(zctx, broker.endpoint)
    try:
        sock.send_multipart([b"MGP02", b"PING", b"{}"] + [b"x"] * (count - 3))
        frames = sock.recv_multipart()
        error = codec.decode(frames)
        assert isinstance(error, Error) and error.code == "malformed"
        assert "expected 3 frames, got 4" in error.message
        sock.send_multipart(codec.encode(Ping()))  # the connection still works
        assert codec.decode(sock.recv_multipart()).COMMAND == "ERROR"  # not logged in
    finally:
        sock.close()


def test_pong_and_online_carry_the_brokers_clock(wire):
    alice, _ = wire.login("alice")
    wire.now += 1234
    assert to(alice, wire.say(alice, Ping())) == [Pong(wire.now)]
    assert to(alice, wire.say(alice, Who())) == [Online(("alice",), wire.now)]


# Section 8: any message from a logged-in connection is a sign of life.


def test_even_a_message_that_earns_an_error_keeps_a_session_alive(wire):
    alice, _ = wire.login("alice")
    watcher, _ = wire.login("watcher")
    timeout = TEST_LIMITS.heartbeat_timeout_ms
    for _ in range(5):
        wire.now += timeout // 2
        assert codes(alice, wire.frames(alice, [b"MGP02", b"NONSENSE", b"{}"])) == [
            "unknown_command"
        ]
        wire.say(watcher, Ping())
        assert wire.core.expire(wire.clock) == []
    wire.now += timeout + 1
    wire.say(watcher, Ping())
    out = wire.core.expire(wire.clock)
    assert to(watcher, out) == [Presence("alice", "left", wire.now)]  # others are told
    assert to(alice, out) == []  # the connection is not
    assert codes(alice, wire.say(alice, Ping())) == ["not_logged_in"]


# Section 12: the SDK's outbox, ids, reconnect delays and socket options.


def test_sdk_message_ids_are_time_then_random_hex_and_grow():
    from mangogram_proto.session import new_message_id

    ids = [new_message_id() for _ in range(100)]
    assert len(set(ids)) == 100
    assert ids == sorted(ids)  # growing within a process: the broker's fast path
    for value in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", value)
    # 14 hex digits of microseconds since the epoch, then 18 of randomness
    assert abs(int(ids[0][:14], 16) - time.time_ns() // 1000) < 3_600_000_000


def test_sdk_outbox_holds_10000_texts_and_refuses_more_locally():
    from mangogram_proto.errors import LocalProtocolError
    from mangogram_proto.session import MAX_OUTBOX, ClientSession

    assert MAX_OUTBOX == 10_000
    session = ClientSession("alice")  # not connected: everything waits in the outbox
    for i in range(MAX_OUTBOX):
        session.send_text("bob", f"{i}", T0)
    with pytest.raises(LocalProtocolError):
        session.send_text("bob", "one too many", T0)
    assert len(session.unacknowledged) == MAX_OUTBOX


def test_sdk_reconnect_delays_double_from_100_ms_to_5_s_with_jitter_half_to_one():
    from mangogram_proto.backoff import Backoff

    lowest = Backoff(rand=lambda: 0.0)
    assert [lowest.next_delay_ms() for _ in range(8)] == [50, 100, 200, 400, 800, 1600, 2500, 2500]
    highest = Backoff(rand=lambda: 0.999999)
    delays = [highest.next_delay_ms() for _ in range(8)]
    assert delays == [99, 199, 399, 799, 1599, 3199, 4999, 4999]
    highest.reset()  # after a WELCOME
    assert highest.next_delay_ms() == 99


def test_sdk_dealer_options_are_the_documented_ones(zctx):
    from mangogram_proto.transport import configure_dealer

    sock = configure_dealer(zctx.socket(zmq.DEALER), "tcp://127.0.0.1:5999", None)
    try:
        assert sock.getsockopt(zmq.LINGER) == 0
        assert sock.getsockopt(zmq.RECONNECT_IVL) == 100
        assert sock.getsockopt(zmq.RECONNECT_IVL_MAX) == 2000
        assert sock.getsockopt(zmq.ROUTING_ID) == b""  # never a chosen routing id
    finally:
        sock.close()


# Section 1: the broker's key, key discovery and the encrypted frame limit.


def test_the_documented_fingerprint_example_and_its_definition():
    import base64
    import hashlib

    from mangogram_proto.keys import fingerprint

    text = PROTOCOL_MD.read_text(encoding="utf-8")
    key = re.search(r"INFO mangogram\.broker: public key (\S{40}) \(fingerprint (\S+)\)", text)
    assert key is not None
    public, printed = key.group(1), key.group(2)
    assert f"The key above has the\nfingerprint `{printed}`" in text
    raw = zmq.utils.z85.decode(public.encode("ascii"))
    by_the_doc = "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")
    assert fingerprint(public) == by_the_doc == printed


ENCRYPTED = {"MANGOGRAM_INSECURE_PLAINTEXT": "0"}


@pytest.fixture
def secure_broker(tmp_path, monkeypatch):
    from .conftest import BrokerProcess

    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    process = BrokerProcess(tmp_path / "broker-data", env=ENCRYPTED)
    yield process
    process.kill()
    assert "Traceback" not in process.log_text(), process.log_text()


@pytest.mark.sockets
def test_key_discovery_answers_mgk01_key_and_ignores_anything_else(secure_broker, zctx):
    sock = dealer(zctx, secure_broker.key_endpoint)
    try:
        for wrong in ([b"MGK01", b"KEYS"], [b"MGK02", b"KEY"], [b"MGK01", b"KEY", b""]):
            sock.send_multipart(wrong)
        sock.send_multipart([b"MGK01", b"KEY"])
        # The broker answers in order, so an answer to a wrong request would come first.
        assert sock.recv_multipart() == [b"MGK01", b"KEY", secure_broker.public_key.encode()]
        assert not sock.poll(200)  # and nothing for the wrong ones after it
    finally:
        sock.close()


@pytest.mark.sockets
def test_a_plaintext_broker_has_no_key_discovery(broker):
    assert broker.key_endpoint == ""
    assert "key discovery on" not in broker.log_text()


def curve_socket(zctx, broker) -> zmq.Socket:
    from mangogram_proto.keys import KeyPair

    pair = KeyPair.generate()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CURVE_SERVERKEY, broker.public_key.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret.encode())
    sock.connect(broker.endpoint)
    return sock


@pytest.mark.sockets
def test_encrypted_frames_may_be_33_bytes_short_of_max_frame_bytes(secure_broker, zctx):
    """protocol.md section 1: on an encrypted connection a frame may have at most
    max_frame_bytes - 33 bytes (65503 by default). One byte more drops the connection:
    no reply to it; libzmq reconnects and the next PING gets not_logged_in."""
    fits = curve_socket(zctx, secure_broker)
    over = curve_socket(zctx, secure_broker)
    try:
        fits.send_multipart([SIGNATURE_V2, b"LOGIN", b"x" * 65503])
        assert fits.poll(5000)
        assert codec.decode(fits.recv_multipart()).code == "too_large"  # the body limit
        over.send_multipart([SIGNATURE_V2, b"LOGIN", b"x" * 65504])
        first = None
        for _ in range(20):  # the PING sent on the dropped connection may be lost
            over.send_multipart(codec.encode(Ping()))
            if over.poll(500):
                first = codec.decode(over.recv_multipart())
                break
        assert isinstance(first, Error) and first.code == "not_logged_in", first
    finally:
        fits.close()
        over.close()


# Section 7: name rules not covered elsewhere (tests/test_names.py has the others).


@pytest.mark.parametrize(
    "name",
    [
        "dev\u200d\U0001f4bb",  # Cf: a zero-width joiner, so no emoji ZWJ sequences
        "👩\u200d💻",
        "line\u2028sep",  # Zl
        "para\u2029sep",  # Zp
        "nb\u00a0sp",  # Zs other than the space
        "new\u0378",  # Cn: unassigned
        "half\ud800",  # Cs: a lone surrogate
    ],
)
def test_names_with_the_listed_categories_are_invalid(name):
    from mangogram_proto.errors import RemoteProtocolError
    from mangogram_proto.names import validate_name

    with pytest.raises(RemoteProtocolError) as caught:
        validate_name(name)
    assert caught.value.code is ErrorCode.NAME_INVALID


@pytest.mark.parametrize("name", ["Олена", "echo-bot", "Манго🥭", "a_b.c-d", "名前"])
def test_the_documented_good_names_are_valid(name):
    from mangogram_proto.names import validate_name

    assert validate_name(name)


def test_the_length_limit_counts_code_points_after_nfc(wire):
    """32 decomposed 'é' (64 code points as typed) are 32 after NFC: valid; the display
    form is the NFC one."""
    import unicodedata

    typed = "e\u0301" * TEST_LIMITS.max_name_chars
    _, welcome = wire.login(typed)
    assert welcome.name == unicodedata.normalize("NFC", typed)
    assert len(welcome.name) == TEST_LIMITS.max_name_chars
    peer = wire.peer()
    assert codes(peer, wire.say(peer, Login("é" * (TEST_LIMITS.max_name_chars + 1)))) == [
        "name_invalid"
    ]


def test_ligature_and_case_spellings_reach_the_same_user(wire):
    fish, _ = wire.login("ﬁsh")
    other = wire.peer()
    assert codes(other, wire.say(other, Login("FISH"))) == ["name_taken"]
    alice, _ = wire.login("alice")
    out = wire.say(alice, Send("m1", "FiSh", "hi", 1))
    assert [type(m) for m in to(fish, out)] == [Deliver]


# Section 2: "each example is exactly what the reference encoder produces".


def documented_examples() -> list[tuple[int, list[bytes]]]:
    """Every message example in protocol.md: one-frame (version 3) lines starting with
    `MGP03` in text blocks, and three-frame (version 2) ones: (line number, frames)."""
    lines = PROTOCOL_MD.read_text(encoding="utf-8").splitlines()
    found = []
    in_text = False
    for number, line in enumerate(lines):
        if line.startswith("```"):
            in_text = line == "```text"
            continue
        if in_text and line.startswith("MGP03"):
            found.append((number + 1, [line.encode("utf-8")]))
        if line.startswith("[0] ") and number + 2 < len(lines):
            one, two = lines[number + 1], lines[number + 2]
            if one.startswith("[1] ") and two.startswith("[2] "):
                frames = [line[4:], one[4:], two[4:]]
                found.append((number + 1, [f.encode("utf-8") for f in frames]))
    return found


def test_the_documents_examples_are_what_the_encoder_produces():
    examples = documented_examples()
    assert len(examples) >= 30
    assert any(len(frames) == 3 for _, frames in examples)  # the version 2 one
    for line, frames in examples:
        message = codec.decode(frames)
        version = 3 if len(frames) == 1 else 2
        assert codec.encode(message, version) == frames, f"protocol.md line {line}"


def test_the_login_example_bytes():
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    hexed = re.search(r"The third frame is these (\d+) bytes: `([0-9a-f ]+)`", text)
    assert hexed is not None
    body = bytes.fromhex(hexed.group(2))
    assert len(body) == int(hexed.group(1))
    assert codec.encode(Login("Олена"), 2)[2] == body
    # The version 3 frame of the same message: the signature, LOGIN, a space, the body.
    (whole,) = codec.encode(Login("Олена"))
    hexed = re.search(r"The version 3 frame is these (\d+) bytes: `([0-9a-f ]+)`", text)
    assert hexed is not None
    assert whole == bytes.fromhex(hexed.group(2)) and len(whole) == int(hexed.group(1))


def test_the_broker_never_sends_null(wire):
    """Section 2: the broker omits optional fields that have no value."""
    import json

    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    out = wire.say(alice, Send("m1", "bob", "x", 1))
    out += wire.say(bob, Receipt(1))
    out += wire.say(alice, History("bob", 5))
    out += wire.say(alice, Who())
    out += wire.say(bob, Leave())
    out += wire.frames(alice, [b"MGP02", b"NOPE", b"{}"])
    peer = wire.peer()
    out += wire.say(peer, Login("bob"))
    assert len(out) >= 8
    for item in out:
        body = codec.encode(item.message, 2)[2]
        assert b"null" not in body.replace(b'"null"', b""), body
        assert None not in json.loads(body).values(), body


# Section 5: owed DELIVEREDs at login.


def test_owed_delivered_at_login_are_capped_at_1000_oldest_first_256_ids_each():
    import dataclasses

    from mangogram_broker.core import RECEIPTS_PER_LOGIN

    assert RECEIPTS_PER_LOGIN == 1000
    limits = dataclasses.replace(
        TEST_LIMITS, max_mailbox=5000, rate_per_second=100_000, rate_burst=100_000
    )
    wire = Wire(limits)
    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    wire.say(bob, Leave())
    broker_ids = []
    for i in range(1100):
        for message in to(alice, wire.say(alice, Send(f"m{i}", "bob", "x", 1))):
            broker_ids += message.broker_ids
    wire.say(alice, Leave())
    wire.now += 10
    bob = wire.peer()
    wire.say(bob, Login("bob", resume_from=1100))  # confirms all 1,100 at once: owed
    wire.now += 10
    reported, counts = [], []
    for _login in range(2):
        peer = wire.peer()
        out = coalesce(wire.say(peer, Login("alice")))  # merged as the shell does
        delivered = [m for m in to(peer, out) if m.COMMAND == "DELIVERED"]
        assert all(len(m.ids) <= 256 for m in delivered)
        reported.append([b for m in delivered for b in m.broker_ids])
        counts.append(len(delivered))
        wire.say(peer, Leave())
    assert len(reported[0]) == RECEIPTS_PER_LOGIN
    assert reported[0] + reported[1] == broker_ids  # oldest first, the rest next time
    assert counts == [4, 1]  # one confirmation time: 256 + 256 + 256 + 232, then 100


# Section 5: history items.


def test_history_items_keep_the_spelling_of_the_time_and_fill_in_delivered_and_read(wire):
    alice, _ = wire.login("alice")
    bob, _ = wire.login("bob")
    (deliver,) = to(bob, wire.say(alice, Send("m1", "BOB", "x", 1)))
    wire.say(alice, Leave())
    alice, _ = wire.login("ALICE")  # another spelling of the same name, later

    def item():
        (page,) = to(alice, wire.say(alice, History("bob", 5)))
        (only,) = page.items
        return only

    first = item()
    # The display forms of that moment, not the `to` as typed ("BOB").
    assert (first.sender, first.to, first.delivered_at, first.read_at) == (
        "alice",
        "bob",
        None,
        None,
    )
    wire.now += 7
    wire.say(bob, Receipt(deliver.seq))
    assert item().delivered_at == wire.now and item().read_at is None
    wire.now += 5
    wire.say(bob, Read(deliver.broker_id))
    assert item().read_at == wire.now
    body = codec.encode(HistoryPage("bob", (first,), False), 2)[2]
    assert b"delivered_at" not in body and b"read_at" not in body  # absent, not null


# Section 2: the order in which a LOGIN is checked (encrypted broker).


def test_login_checks_ownership_before_taken_and_full_and_full_before_new_names():
    core = BrokerCore(TEST_LIMITS, store=MemoryStore(), require_keys=True, max_sessions=100)
    peers = iter(b"\x00" + i.to_bytes(4, "big") for i in range(1, 1000))

    def login(name: str, key: str, address: str = "10.0.0.1") -> tuple[bytes, str]:
        peer = next(peers)
        out = core.handle_frames(peer, codec.encode(Login(name)), Clock(T0, T0), key, address)
        reply = to(peer, out)[0]
        return peer, reply.COMMAND if isinstance(reply, Welcome) else reply.code

    # Use up the new-name allowance of 10.0.0.7 while the broker has room.
    for i in range(50):
        peer, answer = login(f"n{i}", f"K{i}", "10.0.0.7")
        if answer == "rate_limited":
            break
        core.disconnected(peer, Clock(T0, T0))
    assert answer == "rate_limited"
    alice, answer = login("alice", "A", "10.0.0.9")
    assert answer == "WELCOME"
    assert login("alice", "B")[1] == "name_owned"  # online, but not B's: owned comes first
    assert login("bob", "B", "10.0.0.9")[1] == "WELCOME"
    core.disconnected(alice, Clock(T0, T0))
    core.max_sessions = 1  # bob alone fills the broker now
    assert login("alice", "B")[1] == "name_owned"  # full, yet ownership is named first
    assert login("bob", "B")[1] == "name_taken"  # B's own name online, no token: full or not
    # A new name from the address that has no allowance left: full comes first.
    assert login("dave", "D", "10.0.0.7")[1] == "server_full"


# Section 2: body rules for numbers, booleans and the byte-order mark.

SEND_BODY = '{"id":"m1","to":"bob","text":"hi","sent_at":%s}'
DELIVER_BODY = (
    '{"id":"m1","broker_id":"1","sender":"a","text":"t","sent_at":1,"accepted_at":2,'
    '"seq":1,"delayed":%s}'
)


@pytest.mark.parametrize(
    "frames",
    [
        [SIGNATURE_V2, b"SEND", (SEND_BODY % "1767268800000.0").encode()],
        [SIGNATURE_V2, b"SEND", (SEND_BODY % "1.7e12").encode()],
        [SIGNATURE_V2, b"SEND", (SEND_BODY % "17E11").encode()],
        [SIGNATURE_V2, b"SEND", (SEND_BODY % "Infinity").encode()],
        [SIGNATURE_V2, b"SEND", (SEND_BODY % "-Infinity").encode()],
        [SIGNATURE_V2, b"SEND", (SEND_BODY % str(2**63)).encode()],
        [SIGNATURE_V2, b"SEND", (SEND_BODY % str(-(2**63) - 1)).encode()],
        [SIGNATURE_V2, b"SEND", (SEND_BODY % "false").encode()],
        [SIGNATURE_V2, b"SEND", b"\xef\xbb\xbf" + (SEND_BODY % "1").encode()],
        [SIGNATURE_V2, b"DELIVER", (DELIVER_BODY % "0").encode()],
        [SIGNATURE_V2, b"DELIVER", (DELIVER_BODY % "1").encode()],
        [SIGNATURE_V2, b"DELIVER", (DELIVER_BODY % '"true"').encode()],
    ],
)
def test_numbers_booleans_and_a_bom_outside_the_rules_are_malformed(frames):
    from mangogram_proto.errors import RemoteProtocolError

    with pytest.raises(RemoteProtocolError) as caught:
        codec.decode(frames)
    assert caught.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize("value", [2**63 - 1, -(2**63), 0])
def test_the_whole_signed_64_bit_range_is_accepted(value):
    message = codec.decode([SIGNATURE_V2, b"SEND", (SEND_BODY % value).encode()])
    assert isinstance(message, Send) and message.sent_at == value


def test_json_formatting_and_escapes_are_accepted():
    body = (
        b'{ "id" : "m1",\n\t"to": "\\u0062ob",'
        b' "text": "\\u041e\\u043b\\u0435\\u043d\\u0430",\n"sent_at": 1 }'
    )
    message = codec.decode([SIGNATURE_V2, b"SEND", body])
    assert message == Send("m1", "bob", "Олена", 1)
    assert (
        codec.decode([SIGNATURE_V2, b"DELIVER", (DELIVER_BODY % "true").encode()]).delayed is True
    )


# Section 2: version 3 framing.


def test_v3_separator_whitespace_trailing_bytes_and_body_size():
    def code_of(frames: list[bytes], max_body: int | None = None) -> str | None:
        try:
            codec.decode(frames, max_body)
        except RemoteProtocolError as exc:
            return f"{exc.code.value}: {exc.message}"
        return None

    # The separator is one space; a tab or newline belongs to the command name.
    assert code_of([b"MGP03PI\tNG {}"]) == 'unknown_command: unknown command "PI\\u{9}NG"'
    assert code_of([b"MGP03PING\n{}"]).startswith("malformed: no space after the command")
    assert code_of([b"MGP03" + b"A" * 32 + b" {}"]).startswith("unknown_command")
    assert code_of([b"MGP03" + b"A" * 33 + b" {}"]).startswith("malformed: no space")
    assert code_of([b"MGP03 {}"]) == "malformed: no command before the space"
    # JSON whitespace before the object is allowed; bytes after it are not.
    assert code_of([b"MGP03PING  \n {} \n"]) is None
    assert code_of([b"MGP03PING {} x"]).startswith("malformed: body is not valid JSON")
    assert code_of([b"MGP03PING "]).startswith("malformed: body is not valid JSON")
    # max_body_bytes counts the bytes after the space only.
    body = '{"name":"Олена"}'.encode()
    assert code_of([b"MGP03LOGIN " + body], len(body)) is None
    assert code_of([b"MGP03LOGIN " + body], len(body) - 1).startswith("too_large")


def test_the_version_2_login_example_and_the_version_3_one_carry_the_same_body():
    examples = dict(documented_examples())
    v2 = [frames for frames in examples.values() if len(frames) == 3]
    assert len(v2) == 1
    ((whole,),) = [f for f in examples.values() if f[0].startswith(b"MGP03LOGIN")][:1]
    assert whole == b"MGP03LOGIN " + v2[0][2]
