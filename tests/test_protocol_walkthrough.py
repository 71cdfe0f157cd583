"""docs/protocol.md section 11 says its echo-bot transcript is what `BrokerCore` answers:
replay every client line into the core, at the time the answers show, and compare."""

from __future__ import annotations

import json

from mangogram_broker.clock import Clock
from mangogram_broker.core import BrokerCore, coalesce
from mangogram_broker.store import MemoryStore
from mangogram_proto import codec
from mangogram_proto.messages import Welcome

from .conftest import ROOT

# For each client command, the answer and field that carry the broker's clock at that turn.
CLOCK_FROM = {
    "LOGIN": ("WELCOME", "server_time"),
    "SEND": ("ACCEPTED", "accepted_at"),
    "RECEIPT": ("DELIVERED", "delivered_at"),
    "READ": ("SEEN", "read_at"),
    "PING": ("PONG", "server_time"),
    "LEAVE": ("PRESENCE", "at"),
}


def transcript() -> list[tuple[str, str, str, str]]:
    """(who, direction, command, body) for each line of the walk-through."""
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    start = text.index("```text\nbot   → broker  MGP03LOGIN ")
    block = text[start + len("```text\n") : text.index("```", start + 8)]
    parsed = []
    for line in filter(str.strip, block.splitlines()):
        who = line.split(" ", 1)[0]
        direction = "in" if "→ broker" in line else "out"
        frame = line.split("broker  ", 1)[1].encode()
        command, body = codec.split([frame])
        parsed.append((who, direction, command.decode(), body.decode()))
    return parsed


def test_the_echo_bot_walk_through_is_what_the_broker_core_answers():
    lines = transcript()
    welcomes = [
        codec.decode_body(b"WELCOME", body.encode())
        for *_, command, body in lines
        if command == "WELCOME"
    ]
    assert all(isinstance(w, Welcome) for w in welcomes)
    tokens = iter(w.resume_token for w in welcomes)
    core = BrokerCore(welcomes[0].limits, store=MemoryStore(), token_factory=lambda: next(tokens))
    peers: dict[str, bytes] = {}
    connections = 0
    now = 0
    for index, (who, direction, command, body) in enumerate(lines):
        if direction != "in":
            continue
        answers = []
        for later in lines[index + 1 :]:
            if later[1] == "in":
                break
            answers.append(later)
        if command == "LOGIN":  # each login in the transcript is a new connection
            connections += 1
            peers[who] = b"\x00" + connections.to_bytes(4, "big")
        reply, field = CLOCK_FROM.get(command, ("", ""))
        stamps = [json.loads(b)[field] for _, _, c, b in answers if c == reply]
        # A turn whose answers show no clock (a RECEIPT whose DELIVERED is owed) is 1 ms
        # after the one before; the transcript is written that way.
        now = stamps[0] if stamps else now + 1
        frames = codec.frame(command.encode(), body.encode(), 3)
        out = core.handle_frames(peers[who], frames, Clock(now, now))
        core.store.commit()
        names = {peer: name for name, peer in peers.items()}
        produced = []
        for message in coalesce(out):
            command_bytes, body_bytes = codec.encode_parts(message.message)
            produced.append((names[message.peer], command_bytes.decode(), body_bytes.decode()))
        expected = [(w, c, b) for w, _, c, b in answers]
        assert sorted(produced) == sorted(expected), f"after {who} {command} {body}"
    assert connections == 4
