"""Client.close() (and leaving a `with` block) sends what `send(..., wait=False)` queued
before it leaves, and says which texts it could not get accepted. Real broker, real
sockets; the broker's send rate makes the SDK pace its outbox, so texts are still queued
when the block ends."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from mangogram_proto import Client, UnsentMessagesError

from .conftest import BrokerProcess

pytestmark = pytest.mark.sockets


def paced_broker(tmp_path: Path, rate: int, burst: int) -> BrokerProcess:
    return BrokerProcess(
        tmp_path / "data", "--rate-per-second", str(rate), "--rate-burst", str(burst)
    )


@pytest.fixture
def broker_100(tmp_path: Path) -> Iterator[BrokerProcess]:
    process = paced_broker(tmp_path, 100, 10)
    yield process
    process.kill()
    assert "Traceback" not in process.log_text(), process.log_text()


@pytest.fixture
def broker_1(tmp_path: Path) -> Iterator[BrokerProcess]:
    process = paced_broker(tmp_path, 1, 1)
    yield process
    process.kill()
    assert "Traceback" not in process.log_text(), process.log_text()


class QuickClose(Client):
    """Gives up on its outbox after 0.2 s, too soon for 5 texts at one a second."""

    def close(self, timeout: float = 0.2, *, confirm: bool = True) -> None:
        super().close(timeout, confirm=confirm)


def received(endpoint: str, zctx, name: str, count: int) -> list[str]:
    texts: list[str] = []
    with Client(name, endpoint, context=zctx) as client:
        for message in client.messages(timeout=5):
            texts.append(message.text)
            if len(texts) == count:
                break
    return texts


def test_leaving_a_with_block_sends_every_queued_text_first(broker_100, zctx):
    with Client("bob", broker_100.endpoint, context=zctx):
        pass
    texts = [f"t{i}" for i in range(200)]
    with Client("alice", broker_100.endpoint, context=zctx) as alice:
        for text in texts:
            alice.send("bob", text)  # wait=False: only queued
        assert alice.session.outbox_size > 0  # paced: most still queued here
    assert alice.session.outbox_size == 0
    assert received(broker_100.endpoint, zctx, "bob", len(texts)) == texts


def test_close_names_the_texts_it_could_not_get_accepted(broker_1, zctx):
    with Client("bob", broker_1.endpoint, context=zctx):
        pass
    alice = Client("alice", broker_1.endpoint, context=zctx)
    alice.login()
    ids = [alice.send("bob", f"t{i}") for i in range(5)]
    # One text a second at most: 5 cannot all be accepted in 0.2 s.
    with pytest.raises(UnsentMessagesError) as raised:
        alice.close(timeout=0.2)
    assert raised.value.ids
    assert raised.value.ids == ids[len(ids) - len(raised.value.ids) :]
    assert not alice.is_online


def test_an_error_in_the_block_is_not_hidden_by_unsent_texts(broker_1, zctx, caplog):
    with Client("bob", broker_1.endpoint, context=zctx):
        pass
    caplog.set_level(logging.WARNING, logger="mangogram_proto.client")
    with pytest.raises(KeyError), QuickClose("alice", broker_1.endpoint, context=zctx) as alice:
        for i in range(5):
            alice.send("bob", f"t{i}")
        raise KeyError("the application failed")
    assert "closing after an error" in caplog.text
    assert "not accepted by the broker" in caplog.text


def test_a_text_refused_for_good_while_closing_is_logged_not_raised(broker_100, zctx, caplog):
    caplog.set_level(logging.WARNING, logger="mangogram_proto.client")
    with Client("alice", broker_100.endpoint, context=zctx) as alice:
        message_id = alice.send("nobody-has-this-name", "hello?")
    assert f"message {message_id} to nobody-has-this-name refused" in caplog.text
