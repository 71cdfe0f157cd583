"""A bot written with bare pyzmq and docs/protocol.md only: no MangoGram code imported.

It logs in, answers each new DELIVER with a SEND of the text reversed, then confirms what
it has answered with a cumulative RECEIPT, and pings while idle; Ctrl-C or SIGTERM ends it
with a LEAVE. Use it as the template for a bot in any language.

    python examples/raw_bot.py --name reverser --endpoint tcp://127.0.0.1:5555

Encryption: it keeps its key pair in --identity (created on first run; the name belongs
to that key) and takes the broker's key from --server-key, or asks the key-discovery
port (chat port + 1) and prints the fingerprint. --insecure-plaintext talks to a
development broker started with the same flag.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import signal
import time
import uuid
from pathlib import Path

import zmq
import zmq.utils.z85

# Protocol version 3: every message is one frame, b"MGP03" + command + b" " + JSON body.
SIGNATURE = b"MGP03"
log = logging.getLogger("raw_bot")


def now_ms() -> int:
    return int(time.time() * 1000)


def send(sock: zmq.Socket, command: str, body: dict) -> int:
    """Send one protocol message; returns the time it was sent."""
    payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
    sock.send(SIGNATURE + command.encode("ascii") + b" " + payload)
    return now_ms()


def parse(frames: list[bytes]) -> tuple[str, dict] | None:
    """(command, body) of a received message, or None if it is not one MGP03 frame."""
    if len(frames) != 1 or not frames[0].startswith(SIGNATURE):
        return None
    command, space, payload = frames[0][len(SIGNATURE) :].partition(b" ")
    if not space:
        return None
    return command.decode("ascii"), json.loads(payload)


def load_identity(path: Path) -> tuple[bytes, bytes]:
    """This bot's key pair (Z85), created on first run in a file only we can read."""
    if path.exists():
        data = json.loads(path.read_text())
        return data["public"].encode(), data["secret"].encode()
    public, secret = zmq.curve_keypair()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"public": public.decode(), "secret": secret.decode()}, handle)
    return public, secret


def discover_server_key(endpoint: str) -> bytes:
    """Ask the plaintext key-discovery port (chat port + 1) for the broker's public key."""
    host, _, port = endpoint.rpartition(":")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"{host}:{int(port) + 1}")
    sock.send_multipart([b"MGK01", b"KEY"])
    if not sock.poll(3000):
        raise SystemExit("no key-discovery answer; pass --server-key")
    key = sock.recv_multipart()[2]
    sock.close()
    raw = zmq.utils.z85.decode(key)
    digest = base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")
    log.warning("using server key with fingerprint SHA256:%s; check it with the operator", digest)
    return key


def main() -> None:
    parser = argparse.ArgumentParser(description="A MangoGram bot in bare pyzmq.")
    parser.add_argument("--name", default="reverser")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    parser.add_argument(
        "--server-key", help="the broker's public key (Z85); write --server-key=KEY"
    )
    parser.add_argument("--identity", type=Path, default=Path("raw_bot_identity.json"))
    parser.add_argument("--insecure-plaintext", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Ctrl-C and SIGTERM (docker stop, service managers) both end with a LEAVE. Ctrl-C is
    # armed even if we were started with it ignored, as a shell's background job is.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if not args.insecure_plaintext:
        public, secret = load_identity(args.identity)
        server_key = (args.server_key or "").encode() or discover_server_key(args.endpoint)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.connect(args.endpoint)
    last_sent = send(sock, "LOGIN", {"name": args.name})
    heartbeat_ms = 2000
    try:
        serve(sock, args.name, last_sent, heartbeat_ms)
    except KeyboardInterrupt:
        leave(sock)
    sock.close()


def leave(sock: zmq.Socket) -> None:
    """Say LEAVE and wait up to a second for GOODBYE, so others see us leave at once."""
    send(sock, "LEAVE", {})
    deadline = now_ms() + 1000
    while now_ms() < deadline and sock.poll(max(1, deadline - now_ms())):
        message = parse(sock.recv_multipart())
        if message is not None and message[0] == "GOODBYE":
            return


class Stream:
    """Our position in the stream of messages the broker numbers for us: `mark` is the
    highest seq up to which we have received and answered everything (what RECEIPT
    confirms); messages that arrive beyond a gap wait in `above` until it fills."""

    def __init__(self) -> None:
        self.mark = 0
        self.above: set[int] = set()

    def start(self, stream_mark: int) -> None:
        self.mark = max(self.mark, stream_mark)
        self.advance()

    def is_new(self, seq: int) -> bool:
        """Record `seq`; False for a message we already had (a redelivery)."""
        if seq <= self.mark or seq in self.above:
            return False
        self.above.add(seq)
        self.advance()
        return True

    def advance(self) -> None:
        while self.mark + 1 in self.above:
            self.mark += 1
            self.above.discard(self.mark)


def serve(sock: zmq.Socket, name: str, last_sent: int, heartbeat_ms: int) -> None:
    stream = Stream()
    while True:
        if sock.poll(heartbeat_ms // 2):
            message = parse(sock.recv_multipart())
            if message is None:
                log.warning("ignoring a message that is not one MGP03 frame")
                continue
            command, body = message
            if command == "WELCOME":
                heartbeat_ms = body["limits"]["heartbeat_interval_ms"]
                stream.start(body.get("stream_mark", 0))
                log.info("logged in as %s", body["name"])
            elif command == "DELIVER":
                if stream.is_new(body["seq"]):
                    reply = {
                        "id": uuid.uuid4().hex,
                        "to": body["sender"],
                        "text": body["text"][::-1],
                        "sent_at": now_ms(),
                    }
                    last_sent = send(sock, "SEND", reply)
                # Handled (answered) first, then confirmed; a repeat is confirmed again,
                # since the broker resends until it hears a RECEIPT.
                send(sock, "RECEIPT", {"seq": stream.mark})
            elif command == "ERROR":
                log.warning("broker error %s: %s", body["code"], body["message"])
                if body["code"] == "not_logged_in":
                    last_sent = send(sock, "LOGIN", {"name": name})
                elif body["code"] in ("name_taken", "name_invalid", "name_owned", "server_full"):
                    raise SystemExit(1)
        if now_ms() - last_sent >= heartbeat_ms:
            last_sent = send(sock, "PING", {})


if __name__ == "__main__":
    main()
