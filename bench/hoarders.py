"""`python -m bench.hoarders`: what connections that ask and never read cost the broker.

    python -m bench.hoarders                      # 100 hoarders against ./broker.py
    python -m bench.hoarders --broker OLD/broker.py --json

A writer stores `--messages` texts of 16 KiB (4,096 four-byte characters, the largest a
default broker takes) for each of `--peers` users. Then each user connects with a socket
that holds at most one message on its side (ZMQ_RCVHWM 1, a 4 KiB kernel buffer), logs
in, sends `--requests` times HISTORY (its whole conversation with the writer) and WHO,
and never reads. The broker's resident size (psutil) is taken once seeding is done and
again once it stops growing; meanwhile an honest pair exchanges 100 messages, which must
all arrive. Only flags every broker version has are used, so `--broker` can point at an
older checkout for a before/after figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import psutil
import zmq

from mangogram_proto import codec
from mangogram_proto.messages import (
    Accepted,
    Deliver,
    Error,
    Goodbye,
    History,
    Leave,
    Login,
    Message,
    Send,
    Welcome,
    Who,
)

ROOT = Path(__file__).resolve().parent.parent
BIG_TEXT = "😀" * 4096  # 16 KiB of UTF-8
TIMEOUT_MS = 60_000


def start_broker(broker: Path, data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MANGOGRAM_INSECURE_PLAINTEXT="1")
    command = [
        sys.executable, str(broker), "--bind", "tcp://127.0.0.1:*", "--data", str(data_dir),
        "--durability", "normal", "--rate-per-second", "1000000", "--rate-burst", "1000000",
        "--max-mailbox", "1000000", "--heartbeat-interval-ms", "60000",
        "--heartbeat-timeout-ms", "600000", "--log-level", "INFO",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, cwd=broker.parent, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    for _ in range(200):  # a broker logs a few lines before it listens
        line = process.stderr.readline()
        if not line:
            break
        if match := re.search(r"listening on (tcp://\S+)", line):
            threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
            return process, match.group(1)
    process.kill()
    process.wait(10)
    raise RuntimeError(f"{broker} did not start")


def _drain(stream: IO[str]) -> None:
    for _line in stream:
        pass


def recv(sock: zmq.Socket[bytes], timeout_ms: int = TIMEOUT_MS) -> Message:
    if not sock.poll(timeout_ms):
        raise TimeoutError("no answer from the broker")
    return codec.decode(sock.recv_multipart())


def connect(context: zmq.Context[zmq.Socket[bytes]], endpoint: str, name: str,
            hoarding: bool = False) -> zmq.Socket[bytes]:  # fmt: skip
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if hoarding:  # this side keeps next to nothing: what is not read stays at the broker
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(endpoint)
    sock.send_multipart(codec.encode(Login(name)))
    while not isinstance(reply := recv(sock), Welcome):
        if isinstance(reply, Error):
            raise RuntimeError(f"{name} could not log in: {reply.code}")
    return sock


def await_answers(sock: zmq.Socket[bytes], count: int) -> None:
    answered = 0
    for _ in range(10 * count + 100):  # bounded: acknowledgements merge, others interleave
        if answered >= count:
            return
        reply = recv(sock)
        if isinstance(reply, Accepted):
            answered += len(reply.ids)
        elif isinstance(reply, Error) and reply.ref is not None:
            raise RuntimeError(f"seeding refused: {reply.code}")
    raise RuntimeError("seeding did not finish")


def settled_rss(process: psutil.Process, timeout_s: float = 120.0) -> tuple[int, int]:
    """(resident size once it stops changing, largest size seen meanwhile)."""
    previous = peak = process.memory_info().rss
    deadline = time.monotonic() + timeout_s
    stable = 0
    while time.monotonic() < deadline and stable < 3:
        psutil.wait_procs([process], timeout=0.5)
        current = process.memory_info().rss
        peak = max(peak, current)
        stable = stable + 1 if abs(current - previous) < previous / 200 else 0
        previous = current
    return previous, peak


def honest_round(context: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> float:
    """Alice sends Bob 100 texts; seconds until Bob has them all, in order."""
    alice = connect(context, endpoint, "alice")
    bob = connect(context, endpoint, "bob")
    try:
        started = time.monotonic()
        for i in range(100):
            alice.send_multipart(codec.encode(Send(f"h{i}", "bob", f"hello {i}", 1)))
        texts = []
        for _ in range(1000):
            message = recv(bob)
            if isinstance(message, Deliver):
                texts.append(message.text)
                if len(texts) == 100:
                    break
        if texts != [f"hello {i}" for i in range(100)]:
            raise RuntimeError("the honest pair lost or reordered messages")
        return time.monotonic() - started
    finally:
        alice.close(linger=0)
        bob.close(linger=0)


def run(args: argparse.Namespace) -> dict[str, object]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sockets: list[zmq.Socket[bytes]] = []
    with tempfile.TemporaryDirectory() as data_dir:
        process, endpoint = start_broker(Path(args.broker).resolve(), Path(data_dir))
        try:
            names = [f"hoarder{i}" for i in range(args.peers)]
            writer = connect(context, endpoint, "writer")
            sockets.append(writer)
            for name in names:
                sock = connect(context, endpoint, name)
                sock.send_multipart(codec.encode(Leave()))
                while not isinstance(recv(sock), Goodbye):
                    pass
                sock.close(linger=0)
            for name in names:
                for i in range(args.messages):
                    writer.send_multipart(codec.encode(Send(f"{name}-{i}", name, BIG_TEXT, 1)))
                await_answers(writer, args.messages)
            broker = psutil.Process(process.pid)
            seeded, _ = settled_rss(broker)
            for name in names:
                sockets.append(connect(context, endpoint, name, hoarding=True))
            for _ in range(args.requests):
                for sock in sockets[1:]:
                    sock.send_multipart(codec.encode(History("writer", 200)))
                    sock.send_multipart(codec.encode(Who()))
            honest_s = honest_round(context, endpoint)
            settled, peak = settled_rss(broker)
        finally:
            for sock in sockets:
                sock.close(linger=0)
            context.term()
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    mib = 2**20
    return {
        "broker": str(args.broker),
        "peers": args.peers,
        "requests_each": args.requests,
        "messages_each": args.messages,
        "rss_seeded_mib": round(seeded / mib, 1),
        "rss_hoarded_mib": round(settled / mib, 1),
        "rss_peak_mib": round(peak / mib, 1),
        "grown_per_peer_mib": round((settled - seeded) / mib / args.peers, 2),
        "honest_100_messages_s": round(honest_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hoarders",
        description="RSS of the broker while connections ask for big replies and never read",
    )
    parser.add_argument("--broker", default=str(ROOT / "broker.py"), help="broker.py to run")
    parser.add_argument("--peers", type=int, default=100, help="hoarding connections")
    parser.add_argument("--requests", type=int, default=20, help="HISTORY+WHO pairs each")
    parser.add_argument("--messages", type=int, default=40, help="16 KiB texts per hoarder")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:24} {value}")


if __name__ == "__main__":
    main()
