"""The limit: a bare pyzmq ROUTER that forwards [from, to, payload] without parsing.

Clients set their own routing ids and send [to, payload]; the peer named `to` receives
[from, payload]. Nothing is checked, stored or acknowledged: no real broker can be
faster in Python, so MangoGram is measured against it.

    python -m bench.limit_router tcp://127.0.0.1:*           # plaintext: `limit`
    python -m bench.limit_router tcp://127.0.0.1:* --curve   # CurveZMQ: `limit-curve`

With `--curve` every connection is CurveZMQ-encrypted, as MangoGram's are: the router
makes a key pair, prints its public key on the line after the endpoint, and a ZAP
handler (as the broker has) accepts every client that completed the handshake. The
forwarding loop is the same in both.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import zmq

from mangogram_broker.openfiles import raise_open_file_limit

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


def answer_zap(zap: zmq.Socket[bytes]) -> None:
    """Accept every CurveZMQ client, its public key as the User-Id (RFC 27), like the
    broker's handler. It runs in its own thread and only at handshakes, so the
    forwarding loop stays as bare as the plaintext one."""
    try:
        while True:
            request = zap.recv_multipart()
            version, request_id = request[0], request[1]
            user_id = request[7] if len(request) > 7 else b""
            zap.send_multipart([version, request_id, b"200", b"OK", user_id, b""])
    except zmq.ContextTerminated:
        pass
    finally:
        zap.close(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("endpoint")
    parser.add_argument("--curve", action="store_true", help="encrypt every connection")
    args = parser.parse_args()
    raise_open_file_limit()  # a descriptor per connection, as the broker
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, 100_000)
    router.setsockopt(zmq.RCVHWM, 100_000)
    public = b""
    if args.curve:
        # The ZAP handler must be bound before the first handshake.
        zap = context.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(ZAP_ENDPOINT)
        threading.Thread(target=answer_zap, args=(zap,), daemon=True).start()
        public, secret = zmq.curve_keypair()
        router.setsockopt(zmq.CURVE_SERVER, 1)
        router.setsockopt(zmq.CURVE_SECRETKEY, secret)
    router.bind(args.endpoint)
    print(router.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    if args.curve:
        print(public.decode(), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            sender, to, payload = router.recv_multipart()
            router.send_multipart([to, sender, payload])
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        router.close(0)
        context.term()


if __name__ == "__main__":
    main()
