"""The core's side of a cluster, pure: what it tells its `Cluster` port, and how it
applies the events the other brokers send (a fake port, a memory store, no sockets)."""

from __future__ import annotations

from mangogram_broker.clock import Clock
from mangogram_broker.cluster import (
    Alone,
    ClusterEvent,
    Moved,
    Notice,
    RemotePresence,
    StreamGrew,
)
from mangogram_broker.core import BrokerCore
from mangogram_broker.store import MemoryStore
from mangogram_proto.errors import ErrorCode
from mangogram_proto.messages import (
    Deliver,
    Delivered,
    Error,
    Leave,
    Login,
    Presence,
    Read,
    Receipt,
    Seen,
    Send,
    Welcome,
    Who,
)

from .harness import TEST_LIMITS


class FakeCluster:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.pending: list[ClusterEvent] = []

        self.elsewhere: dict[str, str] = {}
        self.sessions_elsewhere: dict[str, str] = {}  # key -> resume token

    def joined(self, key: str, name: str, resume_token: str = "") -> None:
        self.calls.append(("joined", key))

    def proves(self, key: str, resume_token: str | None) -> bool | None:
        if key not in self.sessions_elsewhere:
            return None
        return resume_token == self.sessions_elsewhere[key]

    def left(self, key: str, announce: bool = True) -> None:
        self.calls.append(("left" if announce else "moved away", key))

    def online_elsewhere(self) -> dict[str, str]:
        return self.elsewhere

    def tell(self, key: str, message: object) -> None:
        self.calls.append(("tell", (key, message)))

    def events(self) -> list[ClusterEvent]:
        found, self.pending = self.pending, []
        return found

    def wakeup(self) -> None:
        return None


def peer(number: int) -> bytes:
    return b"\x00" + number.to_bytes(4, "big")


def setup() -> tuple[BrokerCore, FakeCluster, MemoryStore]:
    cluster = FakeCluster()
    store = MemoryStore()
    core = BrokerCore(TEST_LIMITS, store=store, cluster=cluster)
    return core, cluster, store


def login(core: BrokerCore, number: int, name: str, now: int = 1) -> None:
    out = core.handle(peer(number), Login(name), Clock(now, now))
    assert isinstance(out[0].message, Welcome)


def test_a_single_broker_is_alone_and_cluster_events_are_empty():
    core = BrokerCore(TEST_LIMITS)
    assert isinstance(core.cluster, Alone)
    assert core.cluster_events(Clock(5, 5)) == []


def test_logins_and_session_ends_are_told_to_the_cluster():
    core, cluster, _ = setup()
    login(core, 1, "alice")
    core.handle(peer(1), Leave(), Clock(2, 2))
    assert cluster.calls == [("joined", "alice"), ("left", "alice")]


def test_mail_stored_by_another_broker_is_delivered_to_a_user_online_here():
    core, cluster, store = setup()
    login(core, 1, "bob")
    store.remember_user("alice", "alice", 1)
    # Another broker appended to bob's mailbox (same store: JetStream in real life).
    stored = store.append("alice", "alice", "bob", "bob", "m1", "hi", 1, 2)
    cluster.pending.append(StreamGrew("bob", stored.seq))
    out = core.cluster_events(Clock(3, 3))
    assert [(o.peer, type(o.message)) for o in out] == [(peer(1), Deliver)]
    assert out[0].message.text == "hi"
    cluster.pending.append(StreamGrew("bob", stored.seq))  # an old hint again: nothing
    assert core.cluster_events(Clock(4, 4)) == []
    cluster.pending.append(StreamGrew("nobody-here", 7))
    assert core.cluster_events(Clock(4, 4)) == []


def test_receipts_and_reads_for_a_sender_not_here_are_owed_and_offered_to_the_cluster():
    core, cluster, store = setup()
    login(core, 1, "alice")
    login(core, 2, "bob")
    core.handle(peer(1), Send("m1", "bob", "hi", 1), Clock(2, 2))
    core.handle(peer(1), Leave(), Clock(3, 3))  # alice is elsewhere now
    cluster.calls.clear()
    core.handle(peer(2), Receipt(1), Clock(4, 4))
    (kind, (key, delivered)), *_ = cluster.calls
    assert (kind, key, type(delivered)) == ("tell", "alice", Delivered)
    assert delivered.ids == ("m1",)
    assert [m.client_id for m in store.receipts_owed("alice", 10)] == ["m1"]  # durable too
    broker_id = delivered.broker_ids[0]
    core.handle(peer(2), Read(broker_id), Clock(5, 5))
    assert cluster.calls[-1][0] == "tell"
    assert isinstance(cluster.calls[-1][1][1], Seen)


def test_a_notice_from_another_broker_reaches_the_sender_and_settles_what_was_owed():
    core, cluster, store = setup()
    login(core, 1, "alice")
    login(core, 2, "bob")
    core.handle(peer(1), Send("m1", "bob", "hi", 1), Clock(2, 2))
    stored = store.find("alice", "m1")
    assert stored is not None
    store.confirm_through("bob", 1, 3)
    store.owe_receipts([stored.broker_id])
    told = Delivered("bob", 3, ("m1",), (stored.broker_id,))
    cluster.pending.append(Notice("alice", told))
    assert [(o.peer, o.message) for o in core.cluster_events(Clock(4, 4))] == [(peer(1), told)]
    assert store.receipts_owed("alice", 10) == []


def test_a_user_who_moved_to_another_broker_is_let_go_without_a_left_notice():
    core, cluster, _ = setup()
    login(core, 1, "alice")
    login(core, 2, "bob")
    cluster.pending.append(Moved("bob"))
    out = core.cluster_events(Clock(5, 5))
    assert not any(isinstance(o.message, Presence) for o in out)  # bob is still online
    assert core.registry.by_key("bob") is None
    assert ("moved away", "bob") in cluster.calls  # not announced as offline


def test_presence_from_other_brokers_reaches_users_here_and_who_lists_them():
    core, cluster, _ = setup()
    login(core, 1, "alice")
    cluster.pending.append(RemotePresence("bob", "Bob", True))
    cluster.elsewhere["bob"] = "Bob"
    out = core.cluster_events(Clock(5, 5))
    assert [(o.peer, o.message) for o in out] == [(peer(1), Presence("Bob", "joined", 5))]
    (who,) = core.handle(peer(1), Who(), Clock(6, 6))
    assert who.message.users == ("alice", "Bob")
    cluster.pending.append(RemotePresence("bob", "Bob", False))
    del cluster.elsewhere["bob"]
    out = core.cluster_events(Clock(7, 7))
    assert [(o.peer, o.message) for o in out] == [(peer(1), Presence("Bob", "left", 7))]


def test_a_user_online_at_another_broker_is_not_announced_again_when_moving_here():
    core, cluster, _ = setup()
    login(core, 1, "alice")
    cluster.elsewhere["bob"] = "Bob"
    out = core.handle(peer(2), Login("bob"), Clock(8, 8))
    assert not any(isinstance(o.message, Presence) for o in out)


def test_a_name_online_at_another_broker_is_taken_unless_the_login_carries_its_token():
    core, cluster, _store = setup()
    cluster.sessions_elsewhere["bob"] = "bobs-token"
    refused = core.handle(peer(1), Login("Bob"), Clock(1, 1))
    assert [type(o.message) for o in refused] == [Error]
    assert refused[0].message.code == ErrorCode.NAME_TAKEN.value
    assert ("joined", "bob") not in cluster.calls
    wrong = core.handle(peer(2), Login("Bob", resume_token="guess"), Clock(2, 2))
    assert wrong[0].message.code == ErrorCode.NAME_TAKEN.value
    moved = core.handle(peer(3), Login("Bob", resume_token="bobs-token"), Clock(3, 3))
    assert isinstance(moved[0].message, Welcome)  # the session moves here, as a resume
    assert ("joined", "bob") in cluster.calls


def test_a_user_announced_twice_counts_once_in_its_brokers_presence_checksum():
    """The checksum a broker's heartbeat is compared with: a repeated "joined" (a roster
    answering another broker's hello, a resume) or a move must leave (xor, count) as the
    broker itself counts it, or every heartbeat asks for the roster again, for ever."""
    from mangogram_broker.jetstream_cluster import NatsCluster, _checksum

    cluster = NatsCluster.__new__(NatsCluster)  # the table only: no NATS needed
    cluster._remote, cluster._local, cluster._sums = {}, {}, {}
    cluster._came("bob", "Bob", "broker-b")
    cluster._came("bob", "Bob", "broker-b")
    assert cluster._sums["broker-b"] == (_checksum("bob"), 1)
    cluster._came("bob", "Bob", "broker-c")  # moved
    assert cluster._sums["broker-b"] == (0, 0)
    assert cluster._sums["broker-c"] == (_checksum("bob"), 1)


def test_a_stored_hint_of_any_other_shape_is_refused():
    from mangogram_broker.jetstream_cluster import _stored_fields

    good = ["17", 3, "k1", "Аліса", "k2", "Bob", "id-1", "привіт", 1, 2]
    assert _stored_fields(good)
    for bad in (
        {"q": 1},
        good[:9],
        ["x17", *good[1:]],
        ["١٧", *good[1:]],  # Arabic-Indic digits: isdigit() but not a broker id
        [17, *good[1:]],
        [*good[:8], "1", 2],
        [*good[:8], True, 2],
    ):
        assert not _stored_fields(bad), bad
