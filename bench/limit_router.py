"""The limit: a bare pyzmq ROUTER that forwards [from, to, payload] without parsing.

Clients set their own routing ids and send [to, payload]; the peer named `to` receives
[from, payload]. Nothing is checked, stored or acknowledged: no real broker can be
faster in Python, so MangoGram is measured against it.

    python -m bench.limit_router tcp://127.0.0.1:*
"""

from __future__ import annotations

import signal
import sys

import zmq


def main() -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, 100_000)
    router.setsockopt(zmq.RCVHWM, 100_000)
    router.bind(sys.argv[1])
    print(router.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
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
