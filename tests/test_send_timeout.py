"""No in-flight slot leaks: a SEND that gets no answer is sent again and at last failed,
and every refusal frees its slot. Pure session tests with a hand-driven clock, then the
real broker refusing (and dropping refusals beyond its error budget)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest

from mangogram_proto import Client, codec
from mangogram_proto.events import MessageAccepted, MessageFailed
from mangogram_proto.messages import Accepted, Error, Pong, Send, Welcome
from mangogram_proto.session import MAX_IN_FLIGHT, MAX_SEND_ATTEMPTS, NO_ANSWER, ClientSession

from .conftest import ROOT, BrokerProcess
from .harness import TEST_LIMITS

T0 = 1_000_000
# No pacing in the way: these tests are about answers, not rates.
LIMITS = dataclasses.replace(TEST_LIMITS, rate_per_second=1_000_000, rate_burst=1_000_000)
TIMEOUT = LIMITS.heartbeat_timeout_ms


def online() -> ClientSession:
    session = ClientSession("alice")
    session.connect(T0)
    session.receive(codec.encode(Welcome("alice", T0, "token", LIMITS)), T0)
    session.data_to_send()
    return session


def sends(session: ClientSession) -> list[Send]:
    return [codec.decode(f) for f in session.data_to_send() if codec.command_of(f) == b"SEND"]


def run_clock(session: ClientSession, start: int, until: int) -> tuple[list[int], list]:
    """Tick every 100 ms from `start` to `until` with the broker answering pings but
    nothing else; returns when SENDs went out, and the events."""
    sent_at: list[int] = []
    events: list = []
    for now in range(start, until + 1, 100):
        session.receive(codec.encode(Pong(now)), now)  # the broker is alive
        events += session.tick(now)
        sent_at += [now for _ in sends(session)]
    return sent_at, events


def test_unanswered_send_goes_again_with_its_id_then_fails_and_frees_its_slot():
    session = online()
    message_id = session.send_text("bob", "hello?", T0)
    assert [s.id for s in sends(session)] == [message_id]
    end = T0 + TIMEOUT * (2**MAX_SEND_ATTEMPTS - 1)
    sent_at, events = run_clock(session, T0 + 100, end + 100)
    # Again after 1, 2 and 4 timeouts, each a full wait after the one before.
    assert sent_at == [T0 + TIMEOUT, T0 + 3 * TIMEOUT, T0 + 7 * TIMEOUT]
    assert events == [MessageFailed(message_id, "bob", NO_ANSWER, events[0].message)]
    assert "no answer" in events[0].message
    assert session.unacknowledged == ()
    assert session.next_deadline() is not None  # only heartbeats are left to time


def test_resent_text_answered_late_is_accepted_once():
    session = online()
    message_id = session.send_text("bob", "hello?", T0)
    sends(session)
    sent_at, _ = run_clock(session, T0 + 100, T0 + TIMEOUT)
    assert sent_at == [T0 + TIMEOUT]
    answer = Accepted((message_id,), ("7",), T0)
    events = session.receive(codec.encode(answer), T0 + TIMEOUT + 1)
    events += session.receive(codec.encode(answer), T0 + TIMEOUT + 2)  # the second answer
    assert events == [MessageAccepted(message_id, "7", T0)]
    sent_at, events = run_clock(session, T0 + TIMEOUT + 100, T0 + 20 * TIMEOUT)
    assert sent_at == [] and events == []


def test_a_window_of_unanswered_texts_does_not_hold_up_the_next_one_for_ever():
    session = online()
    for i in range(MAX_IN_FLIGHT):
        session.send_text("bob", f"{i}", T0)
    later = session.send_text("carol", "for carol", T0)
    assert len(sends(session)) == MAX_IN_FLIGHT  # carol's waits for a free slot
    end = T0 + TIMEOUT * (2**MAX_SEND_ATTEMPTS - 1) + 100
    carol_sent = []
    for now in range(T0 + 100, end + 1, 100):
        session.receive(codec.encode(Pong(now)), now)
        session.tick(now)
        carol_sent += [s for s in sends(session) if s.id == later]
    assert len(carol_sent) == 1


@pytest.mark.parametrize(
    "code", ["mailbox_full", "unknown_recipient", "too_large", "malformed", "rate_limited"]
)
def test_every_refusal_frees_its_slot(code):
    session = online()
    ids = [session.send_text("bob", f"{i}", T0) for i in range(MAX_IN_FLIGHT + 1)]
    assert len(sends(session)) == MAX_IN_FLIGHT
    refusal = Error(code, "no", ref=ids[0], retry_after_ms=50 if code == "rate_limited" else None)
    events = session.receive(codec.encode(refusal), T0 + 1)
    session.tick(T0 + 100)  # past a rate limit's retry-after
    out = [s.id for s in sends(session)]
    if code == "rate_limited":
        # The texts on the wire behind it are answered first (a broker holds them behind
        # the refused one); then the refused one goes again first, the rest in order.
        assert out == []
        for held in ids[1:MAX_IN_FLIGHT]:
            error = Error(code, "held", ref=held, retry_after_ms=1)
            session.receive(codec.encode(error), T0 + 101)
        session.tick(T0 + 102)
        out = [s.id for s in sends(session)]
        assert out and out == ids[: len(out)]
        assert [s.id for s in session.unacknowledged] == ids
    else:
        assert out == [ids[-1]]  # the waiting one took the freed slot
        assert [(e.id, e.code) for e in events] == [(ids[0], code)]
        assert ids[0] not in [s.id for s in session.unacknowledged]


def test_an_unexpected_refusal_is_retried_a_bounded_number_of_times():
    session = online()
    message_id = session.send_text("bob", "x", T0)
    now = T0
    failed = []
    for attempt in range(1, MAX_SEND_ATTEMPTS + 1):
        (send,) = sends(session)
        assert send.id == message_id, attempt
        events = session.receive(codec.encode(Error("internal", "oops", ref=message_id)), now)
        failed += [e for e in events if isinstance(e, MessageFailed)]
        now += 1000  # the retry after an error without retry_after_ms
        session.receive(codec.encode(Pong(now)), now)
        session.tick(now)
    assert [(e.id, e.code) for e in failed] == [(message_id, "internal")]
    assert sends(session) == []


@pytest.mark.sockets
def test_full_mailbox_does_not_stall_the_sender_for_everyone(tmp_path, zctx):
    # The reproduction. Today's broker drops refusals beyond its error budget
    # (20, then 5/s), so most of the 290 mailbox_full answers never come: the answer
    # timeout must free the slots by resending (each resend can be answered) and at
    # last failing the text.
    broker = BrokerProcess(tmp_path / "data", "--max-mailbox", "10")
    try:
        with Client("bob", broker.endpoint, context=zctx):
            pass
        carol = Client("carol", broker.endpoint, context=zctx)
        alice = Client("alice", broker.endpoint, context=zctx)
        try:
            carol.login()
            alice.login()
            to_bob = [alice.send("bob", f"#{i}") for i in range(300)]
            to_carol = alice.send("carol", "are you there?")
            outcome: dict[str, MessageAccepted | MessageFailed] = {}
            got = None
            deadline = time.monotonic() + 100
            while (got is None or to_carol not in outcome) and time.monotonic() < deadline:
                event = alice.next_event(timeout=0.05)
                if isinstance(event, MessageAccepted | MessageFailed):
                    outcome[event.id] = event
                got = got or carol.receive(timeout=0)
            assert got is not None and got.text == "are you there?", len(outcome)
            assert isinstance(outcome[to_carol], MessageAccepted)
            while alice.session.unacknowledged and time.monotonic() < deadline:
                alice.poll(0.05)
            while (event := alice.next_event(timeout=0)) is not None:
                if isinstance(event, MessageAccepted | MessageFailed):
                    outcome[event.id] = event
            # Every text to bob got its fate, and only 10 fit in his mailbox.
            assert set(outcome) == {*to_bob, to_carol}
            accepted = [i for i in to_bob if isinstance(outcome[i], MessageAccepted)]
            assert accepted == to_bob[:10]
            codes = {outcome[i].code for i in to_bob[10:]}  # type: ignore[union-attr]
            assert codes <= {"mailbox_full", NO_ANSWER}
        finally:
            alice.close(timeout=0.2)
            carol.close(timeout=0.2)
    finally:
        broker.kill()


@pytest.mark.sockets
@pytest.mark.timeout(600)
def test_fifty_thousand_piped_lines_arrive_once_in_order(tmp_path, zctx):
    broker = BrokerProcess(
        tmp_path / "data", "--rate-per-second", "1000000", "--rate-burst", "1000000"
    )
    lines = [f"рядок {i:05d}" for i in range(50_000)]
    source = tmp_path / "lines.txt"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    command = [sys.executable, str(ROOT / "client.py"), "--server", broker.endpoint]
    command += ["--name", "piper", "--to", "carol"]
    env = dict(os.environ, MANGOGRAM_CONFIG_DIR=str(tmp_path / "cfg"), PYTHONPATH=str(ROOT))
    try:
        with Client("carol", broker.endpoint, context=zctx) as carol, source.open("rb") as stdin:
            piper = subprocess.Popen(
                command, env=env, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            try:
                got = []
                for message in carol.messages(timeout=60):
                    got.append(message.text)
                    if len(got) == len(lines):
                        break
            finally:
                _, errors = piper.communicate(timeout=120)
        assert piper.returncode == 0, errors.decode()
        assert len(got) == len(lines)
        assert got == lines
    finally:
        broker.kill()
