"""Coverage-guided fuzzing of the codec and the broker core with atheris (not run in CI).

    pip install atheris
    python fuzz/fuzz_core.py -max_total_time=600

Each input is split into a few messages that logged-in peers send to one BrokerCore; any
exception other than the protocol's own refusals is a bug.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from mangogram_broker.clock import Clock
    from mangogram_broker.core import BrokerCore
    from mangogram_broker.store import MemoryStore
    from mangogram_proto import codec
    from mangogram_proto.constants import SIGNATURE, SIGNATURE_V2
    from mangogram_proto.errors import RemoteProtocolError
    from mangogram_proto.messages import CLIENT_COMMANDS, Limits

LIMITS = Limits(32, 100, 200, 1000, 4096, 1000, 3000, 5, 10, 20, 5)
COMMANDS = [c.COMMAND.encode() for c in CLIENT_COMMANDS]
PEERS = [b"\x00\x00\x00\x00\x01", b"\x00\x00\x00\x00\x02"]


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    core = BrokerCore(LIMITS, store=MemoryStore())
    now = Clock(1_700_000_000_000, 0)
    for peer in PEERS:
        login = [SIGNATURE_V2, b"LOGIN", b'{"name":"user%d"}' % peer[-1]]
        core.handle_frames(peer, login, now)
    for _ in range(provider.ConsumeIntInRange(1, 8)):
        step = provider.ConsumeIntInRange(0, 5000)
        # The wall clock may step either way; the monotonic one only moves forward.
        wall_step = provider.ConsumeIntInRange(-10_000, 10_000) if step == 0 else step
        now = Clock(now.wall + wall_step, now.mono + step)
        peer = PEERS[provider.ConsumeIntInRange(0, 1)]
        command = COMMANDS[provider.ConsumeIntInRange(0, len(COMMANDS) - 1)]
        body = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 300))
        # Both framings: version 3 (one frame) and version 2 (three).
        if provider.ConsumeBool():
            frames = [SIGNATURE + command + b" " + body]
        else:
            frames = [SIGNATURE_V2, command, body]
        with contextlib.suppress(RemoteProtocolError):
            codec.decode(frames)
        for out in core.handle_frames(peer, frames, now):
            codec.encode(out.message)
            codec.encode(out.message, 2)
        core.expire(now)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
