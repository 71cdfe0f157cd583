"""The old design: a TCP chat server with one thread per client and a shared lock.

Line protocol: a client sends "LOGIN name" once, then "SEND to text" lines; the named
client receives "FROM sender text". No storage, no acknowledgements.

    python -m bench.thread_server 127.0.0.1 0
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading


class ThreadServer:
    def __init__(self, host: str, port: int) -> None:
        self.listener = socket.create_server((host, port), backlog=4096)
        self.clients: dict[bytes, socket.socket] = {}
        self.lock = threading.Lock()

    def serve(self) -> None:
        while True:
            connection, _ = self.listener.accept()
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.client, args=(connection,), daemon=True).start()

    def client(self, connection: socket.socket) -> None:
        name = b""
        reader = connection.makefile("rb")
        try:
            for line in reader:
                if line.startswith(b"LOGIN "):
                    name = line[6:].strip()
                    with self.lock:
                        self.clients[name] = connection
                elif line.startswith(b"SEND "):
                    to, _, text = line[5:].partition(b" ")
                    with self.lock:
                        target = self.clients.get(to)
                        if target is not None:
                            target.sendall(b"FROM " + name + b" " + text)
        except OSError:
            pass
        finally:
            with self.lock:
                if self.clients.get(name) is connection:
                    del self.clients[name]
            connection.close()


def main() -> None:
    server = ThreadServer(sys.argv[1], int(sys.argv[2]))
    host, port = server.listener.getsockname()[:2]
    print(f"{host} {port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        server.serve()


if __name__ == "__main__":
    main()
