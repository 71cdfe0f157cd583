"""A bot written with bare pyzmq and docs/protocol.md only: no MangoGram code imported.

It logs in, answers each DELIVER with RECEIPT and then a SEND of the text reversed,
and pings while idle. Use it as the template for a bot in any language.

    python examples/raw_bot.py --name reverser --endpoint tcp://127.0.0.1:5555
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid

import zmq

SIGNATURE = b"MGP01"
log = logging.getLogger("raw_bot")


def now_ms() -> int:
    return int(time.time() * 1000)


def send(sock: zmq.Socket, command: str, body: dict) -> int:
    """Send one protocol message; returns the time it was sent."""
    sock.send_multipart([SIGNATURE, command.encode(), json.dumps(body).encode("utf-8")])
    return now_ms()


def main() -> None:
    parser = argparse.ArgumentParser(description="A MangoGram bot in bare pyzmq.")
    parser.add_argument("--name", default="reverser")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
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
        if sock.recv_multipart()[1] == b"GOODBYE":
            return


def serve(sock: zmq.Socket, name: str, last_sent: int, heartbeat_ms: int) -> None:
    while True:
        if sock.poll(heartbeat_ms // 2):
            frames = sock.recv_multipart()
            if len(frames) != 3 or frames[0] != SIGNATURE:
                log.warning("ignoring a message that is not MGP01")
                continue
            command, body = frames[1].decode(), json.loads(frames[2])
            if command == "WELCOME":
                heartbeat_ms = body["limits"]["heartbeat_interval_ms"]
                log.info("logged in as %s", body["name"])
            elif command == "DELIVER":
                send(sock, "RECEIPT", {"broker_id": body["broker_id"]})
                reply = {
                    "id": uuid.uuid4().hex,
                    "to": body["sender"],
                    "text": body["text"][::-1],
                    "sent_at": now_ms(),
                }
                last_sent = send(sock, "SEND", reply)
            elif command == "ERROR":
                log.warning("broker error %s: %s", body["code"], body["message"])
                if body["code"] == "not_logged_in":
                    last_sent = send(sock, "LOGIN", {"name": name})
                elif body["code"] in ("name_taken", "name_invalid"):
                    raise SystemExit(1)
        if now_ms() - last_sent >= heartbeat_ms:
            last_sent = send(sock, "PING", {})


if __name__ == "__main__":
    main()
