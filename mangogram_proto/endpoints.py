"""Which broker to connect to next: the rotation rule shared by every SDK driver.

A client may be given several endpoints of one cluster (docs/cluster.md), written as one
string separated by commas: "tcp://a:5555,tcp://b:5555". The first connection goes to
the first endpoint; every reconnection after a lost connection goes to the next one in
the list, wrapping round after the last. A successful login does not move the ring, so
a client stays with the broker that answers, and a broker that dies sends its clients on
to the next one (the reconnect backoff still applies). With one endpoint the ring always
gives that one. Pure code: no sockets.
"""

from __future__ import annotations

from collections.abc import Sequence


def split_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """The endpoints in `endpoints` (a comma-separated string, or a list of them), in
    order, stripped, without empty items or repeats.

    Raises:
        ValueError: no endpoint at all.
    """
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    found: list[str] = []
    for item in items:
        endpoint = item.strip()
        if endpoint and endpoint not in found:
            found.append(endpoint)
    if not found:
        raise ValueError(f"no broker endpoint in {endpoints!r}")
    return found


class EndpointRing:
    """The endpoints a client may use, and the one it uses now (`current`).

    Args:
        endpoints: one endpoint, several separated by commas, or a list.
    """

    def __init__(self, endpoints: str | Sequence[str]) -> None:
        self.endpoints: tuple[str, ...] = tuple(split_endpoints(endpoints))
        self._at = 0

    @property
    def current(self) -> str:
        """The endpoint to connect to now."""
        return self.endpoints[self._at]

    def __len__(self) -> int:
        return len(self.endpoints)

    def advance(self) -> str:
        """Move on after a lost connection; returns the endpoint to reconnect to."""
        self._at = (self._at + 1) % len(self.endpoints)
        return self.current
