"""The per-connection backlog: bounded in bytes, in order, backing off from hoarders."""

from __future__ import annotations

from mangogram_broker.core import Outgoing
from mangogram_broker.sendqueue import OVERHEAD_BYTES, RETRY_MAX_MS, Queued, SendQueues
from mangogram_proto import codec
from mangogram_proto.messages import Pong

PEER = b"\x00\x00\x00\x00\x01"


def pong(at: int) -> tuple[Outgoing, list[bytes]]:
    out = Outgoing(PEER, Pong(at))
    return out, codec.encode(out.message)


def test_a_backlog_holds_at_most_its_bytes_and_refuses_the_rest():
    out, frames = pong(1)
    size = OVERHEAD_BYTES + sum(len(f) for f in frames)
    queues = SendQueues(max_bytes=3 * size)
    assert [queues.add(*pong(i), now_ms=0) for i in range(5)] == [True] * 3 + [False] * 2
    assert queues.queued_bytes(PEER) == 3 * size


def test_a_message_bigger_than_the_bound_is_refused_outright():
    out, frames = pong(1)
    assert not SendQueues(max_bytes=10).add(out, frames, now_ms=0)


def test_flush_sends_in_order_until_refused_and_forgets_an_empty_backlog():
    queues = SendQueues()
    for i in range(5):
        queues.add(*pong(i), now_ms=0)
    sent: list[bytes] = []

    def accept_two(queued: Queued) -> bool:
        if len(sent) == 2:
            return False
        sent.append(queued.frames[-1])
        return True

    queues.flush(accept_two, now_ms=10)
    assert sent == [codec.encode(Pong(i))[-1] for i in range(2)]
    sent.clear()
    queues.flush(lambda q: bool(sent.append(q.frames[-1])) or True, now_ms=20)
    assert sent == [codec.encode(Pong(i))[-1] for i in range(2, 5)]
    assert PEER not in queues and queues.next_retry_ms() is None


def test_a_peer_that_does_not_read_is_retried_ever_later():
    queues = SendQueues()
    queues.add(*pong(1), now_ms=0)
    now, waits = 0, []
    for _ in range(12):
        due = queues.next_retry_ms()
        assert due is not None
        waits.append(due - now)
        now = due
        queues.flush(lambda q: False, now_ms=now)
    assert waits[:4] == [1, 2, 4, 8] and waits[-1] == RETRY_MAX_MS
