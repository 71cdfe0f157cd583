"""Pure rules behind failover and retries: the endpoint ring every driver shares, the
retry timing of refused texts and requests (on a hand-driven clock), the optional id of
WHO/HISTORY/LOOKUP echoed in a rate_limited ERROR, and the broker's `taken_over`
notice, in the sans-I/O core and the client session."""

from __future__ import annotations

import pytest

from mangogram_broker.clock import Clock
from mangogram_broker.core import BrokerCore, Outgoing
from mangogram_broker.store import MemoryStore
from mangogram_client.settings import normalise_servers
from mangogram_client.state import ChatState
from mangogram_proto import codec
from mangogram_proto.endpoints import EndpointRing, split_endpoints
from mangogram_proto.events import (
    BrokerError,
    HistoryReceived,
    LoginRefused,
    MessageAccepted,
    MessageFailed,
    NameStatus,
    OnlineUsers,
)
from mangogram_proto.messages import (
    Accepted,
    Error,
    History,
    HistoryPage,
    Login,
    Lookup,
    NameInfo,
    Online,
    Pong,
    Send,
    Welcome,
    Who,
)
from mangogram_proto.session import (
    MAX_REQUESTS,
    MAX_SEND_ATTEMPTS,
    REQUEST_KEEP_MS,
    RETRY_INITIAL_MS,
    RETRY_MAX_MS,
    ClientSession,
    State,
    retry_delay_ms,
)

from .harness import TEST_LIMITS

NOW = Clock(1_767_268_800_000, 1_000)

# The endpoint ring


def test_the_ring_starts_at_the_first_endpoint_and_moves_on_at_each_reconnection():
    ring = EndpointRing(" tcp://a:1 , tcp://b:2,,tcp://c:3 ")
    assert ring.endpoints == ("tcp://a:1", "tcp://b:2", "tcp://c:3")
    assert ring.current == "tcp://a:1"
    assert [ring.advance() for _ in range(4)] == [
        "tcp://b:2",
        "tcp://c:3",
        "tcp://a:1",
        "tcp://b:2",
    ]
    assert ring.current == "tcp://b:2"  # reading it does not move it


def test_one_endpoint_is_always_the_one_and_repeats_are_dropped():
    ring = EndpointRing("tcp://a:1")
    assert [ring.advance() for _ in range(3)] == ["tcp://a:1"] * 3
    assert split_endpoints(["tcp://a:1", "tcp://b:2", "tcp://a:1"]) == ["tcp://a:1", "tcp://b:2"]
    with pytest.raises(ValueError):
        EndpointRing(" , ")


def test_the_console_client_takes_a_comma_list_of_addresses():
    assert normalise_servers("a, b:6000,tcp://c:7000,a") == (
        "tcp://a:5555,tcp://b:6000,tcp://c:7000"
    )
    assert normalise_servers("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    with pytest.raises(ValueError, match="port"):
        normalise_servers("a,b:99999")
    with pytest.raises(ValueError):
        normalise_servers(",")


# Retry timing of refused texts


def test_retry_delay_is_the_brokers_retry_after_else_a_bounded_doubling():
    assert retry_delay_ms(1, 37) == 37
    assert retry_delay_ms(5, 0) == 0
    assert [retry_delay_ms(n, None) for n in (1, 2, 3, 4)] == [
        RETRY_INITIAL_MS,
        2 * RETRY_INITIAL_MS,
        4 * RETRY_INITIAL_MS,
        8 * RETRY_INITIAL_MS,
    ]
    assert retry_delay_ms(40, None) == RETRY_MAX_MS


def online_session(now: int = 0) -> ClientSession:
    session = ClientSession("alice", id_factory=iter(f"id{n}" for n in range(1000)).__next__)
    session.connect(now)
    session.data_to_send()
    session.receive(codec.encode(Welcome("alice", now, "token-1", TEST_LIMITS)), now)
    session.data_to_send()
    return session


def sent(session: ClientSession) -> list:
    """What the session sends now, heartbeats left out."""
    messages = [codec.decode(frames) for frames in session.data_to_send()]
    return [m for m in messages if m.COMMAND != "PING"]


def refuse(session: ClientSession, ref: str, code: str, now: int, retry_after: int | None = None):
    return session.receive(codec.encode(Error(code, "no", ref, retry_after)), now)


def test_an_unavailable_text_is_resent_with_its_id_after_a_doubling_backoff_for_ever():
    session = online_session()
    message_id = session.send_text("bob", "hi", 0)
    assert [m.id for m in sent(session)] == [message_id]
    now = 10
    refusals = 3 * MAX_SEND_ATTEMPTS  # far beyond the bound of other refusals
    for refusal in range(1, refusals + 1):
        events = refuse(session, message_id, "unavailable", now)
        assert [e.ref for e in events if isinstance(e, BrokerError)] == [message_id]
        assert not [e for e in events if isinstance(e, MessageFailed)]
        delay = min(RETRY_MAX_MS, RETRY_INITIAL_MS << (refusal - 1))
        # Not before the backoff (no wait for the answer timeout either)...
        assert session.next_deadline() <= now + delay
        session.receive(codec.encode(Pong(now)), now + delay - 1)  # the broker lives
        session.tick(now + delay - 1)
        assert sent(session) == []
        # ...and then the same text, same id.
        session.tick(now + delay)
        (again,) = sent(session)
        assert isinstance(again, Send) and again.id == message_id and again.text == "hi"
        now += delay + 5
    assert delay == RETRY_MAX_MS  # the backoff stopped growing at its cap
    events = session.receive(codec.encode(Accepted((message_id,), ("b1",), now)), now)
    assert [e.id for e in events if isinstance(e, MessageAccepted)] == [message_id]
    assert session.outbox_size == 0


def test_a_refusal_with_retry_after_waits_that_long_and_later_texts_keep_their_order():
    session = online_session()
    first = session.send_text("bob", "one", 0)
    sent(session)
    refuse(session, first, "unavailable", 5, retry_after=1234)
    second = session.send_text("bob", "two", 6)  # held back: it must not overtake "one"
    assert sent(session) == []
    assert session.next_deadline() <= 5 + 1234
    session.tick(5 + 1234)
    assert [m.id for m in sent(session)] == [first, second]


@pytest.mark.parametrize("code", ["rate_limited", "unavailable"])
def test_flow_control_refusals_never_fail_a_text_while_the_session_lives(code):
    session = online_session()
    message_id = session.send_text("bob", "hi", 0)
    sent(session)
    now = 0
    wait = 250  # longer than the session's own pacing interval (1 / 4.5 s)
    for _ in range(10 * MAX_SEND_ATTEMPTS):
        events = refuse(session, message_id, code, now, retry_after=wait)
        assert [type(e) for e in events] == [BrokerError]
        session.tick(now + wait - 1)
        assert sent(session) == []
        session.tick(now + wait)
        assert [m.id for m in sent(session)] == [message_id]
        now += wait
    assert session.unacknowledged[0].id == message_id


def test_flow_control_refusals_leave_the_answer_timeout_bound_as_it_was():
    # Refusals were answers: the text that then goes unanswered still gets the first
    # answer timeout and MAX_SEND_ATTEMPTS transmissions before `no_answer`.
    session = online_session()
    message_id = session.send_text("bob", "hi", 0)
    sent(session)
    now = 0
    for _ in range(2 * MAX_SEND_ATTEMPTS):
        refuse(session, message_id, "rate_limited", now, retry_after=20)
        now += 20
        session.tick(now)
        assert [m.id for m in sent(session)] == [message_id]
    timeout = session.answer_timeout_ms
    assert session.next_deadline() == min(now + timeout, now + TEST_LIMITS.heartbeat_interval_ms)
    failed: list[MessageFailed] = []
    transmissions = 1
    for attempt in range(1, MAX_SEND_ATTEMPTS + 1):
        now += timeout << (attempt - 1)
        # The broker is alive (it answers PINGs), it only never answers this text.
        session.receive(codec.encode(Pong(now)), now)
        events = session.tick(now)
        failed += [e for e in events if isinstance(e, MessageFailed)]
        transmissions += sum(isinstance(m, Send) for m in sent(session))
    assert [(e.id, e.code) for e in failed] == [(message_id, "no_answer")]
    assert transmissions == MAX_SEND_ATTEMPTS


def test_other_refusals_worth_retrying_are_still_bounded():
    session = online_session()
    message_id = session.send_text("bob", "hi", 0)
    sent(session)
    now = 0
    for attempt in range(1, MAX_SEND_ATTEMPTS):
        assert not [
            e for e in refuse(session, message_id, "internal", now) if isinstance(e, MessageFailed)
        ]
        now += retry_delay_ms(attempt, None)
        session.tick(now)
        assert [m.id for m in sent(session)] == [message_id]
    events = refuse(session, message_id, "internal", now)
    (failed,) = [e for e in events if isinstance(e, MessageFailed)]
    assert (failed.id, failed.code) == (message_id, "internal")
    assert f"{MAX_SEND_ATTEMPTS} times" in failed.message
    assert session.outbox_size == 0


def test_after_a_refusal_nothing_goes_until_the_texts_on_the_wire_are_answered():
    # Texts 2 and 3 were on the wire when 1 was refused; the broker holds them behind 1.
    # Sending 1 (or a new 4) before their answers come could let 4 be stored before the
    # resend of 2: so the session waits for those answers, then sends 1, 2, 3, 4 in order.
    session = online_session()
    ids = [session.send_text("bob", f"t{n}", 0) for n in (1, 2, 3)]
    assert [m.id for m in sent(session)] == ids
    refuse(session, ids[0], "rate_limited", 10, retry_after=100)
    fourth = session.send_text("bob", "t4", 20)
    session.tick(110)
    assert sent(session) == []  # the hold is over, but 2 and 3 are unanswered
    refuse(session, ids[1], "rate_limited", 111, retry_after=1)
    session.tick(112)
    assert sent(session) == []  # 3 still unanswered
    refuse(session, ids[2], "rate_limited", 113, retry_after=1)
    assert session.next_deadline() <= 114
    session.tick(114)
    assert [m.id for m in sent(session)] == [*ids, fourth]


def test_after_a_refusal_an_unanswered_text_still_frees_the_way_at_its_answer_timeout():
    session = online_session()
    first = session.send_text("bob", "t1", 0)
    second = session.send_text("bob", "t2", 0)
    sent(session)
    refuse(session, first, "rate_limited", 10, retry_after=100)
    session.tick(110)
    assert sent(session) == []
    # The answer for the second never comes (an old broker dropped it, say).
    now = session.answer_timeout_ms
    session.receive(codec.encode(Pong(now)), now)
    session.tick(now)
    assert [m.id for m in sent(session)] == [first, second]


def test_a_refused_text_accepted_on_a_retry_is_reported_accepted_once():
    session = online_session()
    message_id = session.send_text("bob", "hi", 0)
    sent(session)
    refuse(session, message_id, "unavailable", 1)
    session.tick(1 + RETRY_INITIAL_MS)
    sent(session)
    events = session.receive(
        codec.encode(Accepted((message_id,), ("b1",), 2)), 2 + RETRY_INITIAL_MS
    )
    assert [e.id for e in events if isinstance(e, MessageAccepted)] == [message_id]
    assert session.outbox_size == 0 and session.next_deadline() is not None


# WHO / HISTORY / LOOKUP ids and their retries


def test_requests_carry_an_id_and_a_rate_limited_one_is_asked_again_after_retry_after():
    session = online_session()
    who = session.request_online(0)
    history = session.request_history("bob", 5, None, 0)
    lookup = session.lookup_name("carol", 0)
    assert sent(session) == [Who(who), History("bob", 5, None, history), Lookup("carol", lookup)]
    # A refusal naming the request is not an answer: no event, the question goes again.
    assert refuse(session, who, "rate_limited", 10, retry_after=300) == []
    assert session.next_deadline() <= 310
    session.tick(309)
    assert sent(session) == []
    session.tick(310)
    assert sent(session) == [Who(who)]
    answers = session.receive(codec.encode(HistoryPage("bob", (), False)), 311)
    answers += session.receive(codec.encode(NameInfo("carol", True)), 311)
    answers += session.receive(codec.encode(Online(("alice",), 311)), 311)
    assert [type(e) for e in answers] == [HistoryReceived, NameStatus, OnlineUsers]
    session.tick(2000)
    assert session.state is State.ONLINE
    assert sent(session) == []  # nothing left to ask again


def test_a_request_refused_every_time_is_given_up_with_its_id():
    session = online_session()
    who = session.request_online(0)
    sent(session)
    now = 0
    for _ in range(MAX_SEND_ATTEMPTS - 1):
        assert refuse(session, who, "rate_limited", now, retry_after=100) == []
        now += 100
        session.tick(now)
        assert sent(session) == [Who(who)]
    (gave_up,) = refuse(session, who, "rate_limited", now, retry_after=100)
    assert isinstance(gave_up, BrokerError)
    assert (gave_up.code, gave_up.ref, gave_up.retry_after_ms) == ("rate_limited", who, 100)


def test_a_request_asked_while_offline_goes_out_after_the_login():
    session = ClientSession("alice")
    session.connect(0)
    sent(session)
    who = session.request_online(1)
    assert sent(session) == []  # not before WELCOME: it would be refused not_logged_in
    session.receive(codec.encode(Welcome("alice", 2, "t", TEST_LIMITS)), 2)
    assert sent(session) == [Who(who)]


def test_a_request_lost_with_the_connection_is_asked_again_after_the_next_login():
    session = online_session()
    who = session.request_online(0)
    lookup = session.lookup_name("carol", 0)
    sent(session)
    assert session.tick(TEST_LIMITS.heartbeat_timeout_ms + 1)  # ConnectionLost
    session.connect(3500)
    session.data_to_send()
    session.receive(codec.encode(Welcome("alice", 0, "t2", TEST_LIMITS)), 3600)
    assert sent(session) == [Who(who), Lookup("carol", lookup)]
    # One that waited longer than REQUEST_KEEP_MS is forgotten at the next login.
    assert session.tick(3600 + TEST_LIMITS.heartbeat_timeout_ms + 1)
    session.connect(REQUEST_KEEP_MS + 1)
    session.data_to_send()
    session.receive(codec.encode(Welcome("alice", 0, "t3", TEST_LIMITS)), REQUEST_KEEP_MS + 2)
    assert sent(session) == []


def test_at_most_max_requests_are_remembered():
    session = online_session()
    ids = [session.request_online(0) for _ in range(MAX_REQUESTS + 3)]
    sent(session)
    # The oldest were forgotten: a refusal naming one is only reported, not retried.
    (forgotten,) = refuse(session, ids[0], "rate_limited", 1, retry_after=5)
    assert isinstance(forgotten, BrokerError) and forgotten.ref == ids[0]
    assert refuse(session, ids[-1], "rate_limited", 1, retry_after=5) == []


def test_requests_keep_their_old_wire_form_for_an_old_broker():
    # The id is optional: absent, WHO is the same `{}` as before.
    assert codec.encode(Who()) == [b"MGP03WHO {}"]
    assert codec.decode([b"MGP02", b"HISTORY", b'{"peer":"bob","limit":3}']) == History("bob", 3)


# The broker core: ids echoed in rate_limited ERRORs


def peer(n: int) -> bytes:
    return b"\x00" + n.to_bytes(4, "big")


def say(core: BrokerCore, who: bytes, message, key: str | None = None) -> list[Outgoing]:
    return core.handle_frames(who, codec.encode(message), NOW, key, "127.0.0.1")


def logged_in(core: BrokerCore, who: bytes, name: str, key: str | None = None) -> Welcome:
    (welcome, *_rest) = say(core, who, Login(name), key)
    assert isinstance(welcome.message, Welcome), welcome
    return welcome.message


@pytest.mark.parametrize(
    "ask",
    [
        lambda n: Who(f"w{n}"),
        lambda n: History("bob", 2, None, f"h{n}"),
        lambda n: Lookup("x", f"l{n}"),
    ],
)
def test_a_rate_limited_request_with_an_id_gets_it_back_as_ref(ask):
    core = BrokerCore(TEST_LIMITS, store=MemoryStore())
    logged_in(core, peer(1), "alice")
    refusals = []
    for n in range(40):
        for out in say(core, peer(1), ask(n)):
            if isinstance(out.message, Error):
                refusals.append((n, out.message))
    assert refusals, "never rate limited"
    n, first = refusals[0]
    assert first.code == "rate_limited" and first.ref == ask(n).id and first.retry_after_ms
    assert all(error.ref == ask(k).id for k, error in refusals)
    # They still spend the error budget (5/s, burst 10): a flood is not answered in full,
    # and nobody is disconnected for it.
    assert len(refusals) < 40 - core.rates.burst(core.rates.who)
    assert core.registry.by_key("alice") is not None


def test_a_rate_limited_request_without_an_id_has_no_ref_as_before():
    core = BrokerCore(TEST_LIMITS, store=MemoryStore())
    logged_in(core, peer(1), "alice")
    errors = [o.message for _ in range(20) for o in say(core, peer(1), Who())]
    refused = [e for e in errors if isinstance(e, Error)]
    assert refused and all(e.code == "rate_limited" and e.ref is None for e in refused)


# taken_over


def test_a_takeover_tells_the_old_connection_and_a_token_resume_does_not():
    core = BrokerCore(TEST_LIMITS, store=MemoryStore(), require_keys=True)
    welcome = logged_in(core, peer(1), "Mei", "key-mei")
    # The client itself resuming on a new connection (its token): the old one is dead.
    out = say(core, peer(2), Login("Mei", resume_token=welcome.resume_token), "key-mei")
    assert isinstance(out[0].message, Welcome)
    assert [o for o in out if o.peer == peer(1)] == []
    # Another window with the same key taking the session over: the old one is told.
    out = say(core, peer(3), Login("mei", takeover=True), "key-mei")
    assert isinstance(out[0].message, Welcome) and out[0].peer == peer(3)
    assert [o.message for o in out if o.peer == peer(2)] == [
        Error("taken_over", "mei signed in elsewhere")
    ]


def test_a_session_moved_to_another_broker_of_the_cluster_is_told_too():
    from mangogram_broker.cluster import Moved

    from .test_cluster_core import login as cluster_login
    from .test_cluster_core import setup as cluster_setup

    core, cluster, _ = cluster_setup()
    cluster_login(core, 1, "alice")
    cluster_login(core, 2, "bob")
    cluster.pending.append(Moved("bob"))
    out = core.cluster_events(Clock(5, 5))
    assert [(o.peer, o.message) for o in out] == [
        (peer(2), Error("taken_over", "bob signed in elsewhere"))
    ]
    assert core.registry.by_key("bob") is None


def test_a_session_told_taken_over_stops_and_never_logs_in_again():
    session = online_session()
    session.send_text("bob", "queued", 0)
    sent(session)
    events = session.receive(codec.encode(Error("taken_over", "Mei signed in elsewhere")), 5)
    assert events == [LoginRefused("taken_over", "Mei signed in elsewhere")]
    assert session.state is State.CLOSED
    assert session.next_deadline() is None
    assert session.tick(10**9) == []  # no ConnectionLost: no reconnect
    assert sent(session) == []


def test_an_old_client_session_only_logs_a_taken_over_it_does_not_know():
    # What a client without this rule does: the unknown code is a BrokerError, and it
    # goes on as before (reconnects after the heartbeat timeout, gets name_taken).
    session = online_session()
    events = session.receive(codec.encode(Error("some_new_code", "x")), 5)
    assert events == [BrokerError("some_new_code", "x", None)]
    assert session.state is State.ONLINE


def test_the_console_says_once_that_its_texts_are_being_retried():
    state = ChatState("Олена")
    first, second = "id-1", "id-2"
    state.sent(first, "bob", "one", 0)
    state.sent(second, "bob", "two", 0)
    refusal = "message storage is unavailable; retry"
    lines = state.on_event(BrokerError("unavailable", refusal, None, first), 1)
    assert [line.text for line in lines] == [f"{refusal}; retrying…"]
    assert state.on_event(BrokerError("unavailable", refusal, None, second), 2) == []
    assert state.on_event(BrokerError("unavailable", refusal, None, first), 3) == []
    state.on_event(MessageAccepted(first, "b1", 4), 4)
    # A later outage is said again.
    assert len(state.on_event(BrokerError("unavailable", refusal, None, second), 5)) == 1


def test_a_texts_rate_limited_answer_during_a_re_login_is_no_login_refusal():
    # A SEND's refusal (it has a ref) arriving after `not_logged_in` started a new login
    # on the same socket must not be taken for a LOGIN refused for too many new names.
    session = online_session()
    message_id = session.send_text("bob", "hi", 0)
    sent(session)
    session.receive(codec.encode(Error("not_logged_in", "log in first")), 5)
    assert session.state is State.LOGGING_IN
    events = refuse(session, message_id, "rate_limited", 6, retry_after=10)
    assert session.state is State.LOGGING_IN
    assert [type(e) for e in events] == [BrokerError]
    session.data_to_send()
    session.receive(codec.encode(Welcome("alice", 7, "token-2", TEST_LIMITS)), 7)
    assert [m.id for m in sent(session)] == [message_id]


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (History("bob", 0, None, "h1"), "limit must be positive"),
        (History("bob", 5, "not-an-id", "h1"), "before must be a broker id"),
    ],
)
def test_a_history_refused_as_malformed_names_its_id(request_, reason):
    # Without the ref the SDK would take the next HISTORY_PAGE for this request's answer.
    core = BrokerCore(TEST_LIMITS, store=MemoryStore())
    logged_in(core, peer(1), "alice")
    (out,) = say(core, peer(1), request_)
    assert isinstance(out.message, Error)
    assert (out.message.code, out.message.message, out.message.ref) == ("malformed", reason, "h1")


def test_a_login_refused_rate_limited_is_a_lost_connection_retried_after_the_backoff():
    # (protocol.md section 12, "Resume token")
    from mangogram_proto.events import ConnectionLost

    session = ClientSession("alice")
    session.connect(0)
    session.data_to_send()
    events = session.receive(codec.encode(Error("rate_limited", "too many new names")), 1)
    assert [type(event) for event in events] == [ConnectionLost]
    assert session.state is State.DISCONNECTED
    session.connect(2)  # what the driver does after its backoff
    assert [type(m) for m in sent(session)] == [Login]
