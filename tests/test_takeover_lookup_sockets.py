"""LOGIN's `takeover` and LOOKUP through the SDK, against the real encrypted broker on
127.0.0.1 (CurveZMQ keys, so the owner of a name is a real key)."""

from __future__ import annotations

import pytest

from mangogram_proto import BrokerRefused, Client, ErrorCode
from mangogram_proto.keys import KeyPair

from .conftest import BrokerProcess

ENCRYPTED = {"MANGOGRAM_INSECURE_PLAINTEXT": "0"}


@pytest.fixture
def secure_broker(tmp_path, monkeypatch):
    monkeypatch.setenv("MANGOGRAM_INSECURE_PLAINTEXT", "0")
    broker = BrokerProcess(tmp_path / "broker-data", env=ENCRYPTED)
    yield broker
    broker.kill()
    assert "Traceback" not in broker.log_text(), broker.log_text()


def test_the_owner_key_takes_over_and_looks_names_up(secure_broker, zctx):
    def client(name: str, identity: KeyPair, **options) -> Client:
        return Client(
            name,
            secure_broker.endpoint,
            context=zctx,
            server_key=secure_broker.public_key,
            identity=identity,
            plaintext=False,
            **options,
        )

    mei_key = KeyPair.generate()
    first = client("Mei", mei_key)
    others: list[Client] = [first]
    try:
        first.login()
        plain = client("mei", mei_key)
        others.append(plain)
        with pytest.raises(BrokerRefused) as refused:
            plain.login()
        assert refused.value.code is ErrorCode.NAME_TAKEN  # no flag: as before
        eve = client("Mei", KeyPair.generate(), takeover=True)
        others.append(eve)
        with pytest.raises(BrokerRefused) as refused:
            eve.login()
        assert refused.value.code is ErrorCode.NAME_OWNED  # another key: never
        second = client("mei", mei_key, takeover=True)
        others.append(second)
        assert second.login().name == "mei"

        bob = client("bob", KeyPair.generate())
        others.append(bob)
        bob.login()
        assert bob.is_registered("MEI") and not bob.is_registered("Nobody")
        bob.send("Mei", "which one of you?", wait=True)
        message = second.receive(timeout=10)
        assert message is not None and message.text == "which one of you?"
        second.confirm(message)
        # The old connection is told (ERROR taken_over) and stops: it does not try to
        # win the name back (its token would not match anyway).
        with pytest.raises(BrokerRefused) as told:
            first.poll(10)
        assert told.value.wire_code == "taken_over"
        assert not first.is_online
        second.poll(1.5)  # longer than the test broker's heartbeat timeout
        assert second.is_online
    finally:
        for one in others:
            one.close(confirm=False)
