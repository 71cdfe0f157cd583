"""The broker's side of CurveZMQ: its key pair, the ZAP handler that turns each client's
key into the User-Id stamped on its messages, and the plaintext key-discovery answer."""

from __future__ import annotations

import logging
from pathlib import Path

from zmq.utils import z85

from mangogram_proto.keys import KEY_COMMAND, KEY_SIGNATURE, KeyPair, load_or_create_keypair

log = logging.getLogger(__name__)

KEY_FILE = "broker_key.json"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"


def load_broker_keys(key_file: Path) -> tuple[KeyPair, bool]:
    """The broker's key pair (secret file mode 0600), created on first start; brokers
    starting at once on one new file all get the same pair (it is created under a lock)."""
    return load_or_create_keypair(key_file)


def zap_reply(request: list[bytes]) -> list[bytes]:
    """Answer one ZAP request (RFC 27). Every CurveZMQ client that completed the handshake
    is let in, identified by its public key; names are tied to keys by the core."""
    if len(request) < 6 or request[0] != ZAP_VERSION:
        log.warning("malformed ZAP request")
        request_id = request[1] if len(request) > 1 else b""
        return [ZAP_VERSION, request_id, b"500", b"malformed ZAP request", b"", b""]
    request_id, mechanism = request[1], request[5]
    if mechanism != b"CURVE" or len(request) != 7 or len(request[6]) != 32:
        return [ZAP_VERSION, request_id, b"400", b"CurveZMQ required", b"", b""]
    user_id = z85.encode(request[6])
    return [ZAP_VERSION, request_id, b"200", b"OK", user_id, b""]


def key_reply(request: list[bytes], public: str) -> list[bytes] | None:
    """The answer to a key-discovery request (routing id first), or None to ignore it."""
    if len(request) == 3 and request[1:] == [KEY_SIGNATURE, KEY_COMMAND]:
        return [request[0], KEY_SIGNATURE, KEY_COMMAND, public.encode("ascii")]
    return None
