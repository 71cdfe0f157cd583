"""The client without a UI: one message, a listener printing JSON, or lines from stdin."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from mangogram_proto import BrokerRefused, Client, LocalProtocolError
from mangogram_proto.events import IncomingMessage, MessageAccepted, MessageFailed
from mangogram_proto.keys import KeyFileError, ServerKeyError
from mangogram_proto.session import MAX_IN_FLIGHT

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 30.0
# Lines read ahead of their answers: twice the SDK's in-flight window keeps it full.
SEND_WINDOW = 2 * MAX_IN_FLIGHT


def use_utf8_streams() -> None:
    """Script modes read and write UTF-8 whatever the locale: on Windows a redirected
    stdin/stdout otherwise uses the ANSI code page (cp1252...), which garbles piped
    Ukrainian and cannot write it out at all. stderr keeps its encoding but can no longer
    fail on a character it lacks."""
    for stream in (sys.stdin, sys.stdout):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(encoding="utf-8")
    if isinstance(sys.stderr, io.TextIOWrapper):
        sys.stderr.reconfigure(errors="backslashreplace")


def reporting_failures(work: Callable[[], int]) -> int:
    """Run a script mode; what went wrong becomes one line on stderr and exit code 1."""
    try:
        return work()
    except BrokerRefused as exc:
        print(f"mangogram: {exc.message}", file=sys.stderr)
    except (TimeoutError, LocalProtocolError, ServerKeyError, KeyFileError) as exc:
        print(f"mangogram: {exc}", file=sys.stderr)
    return 1


def send_one(server: str, name: str, to: str, text: str, security: dict[str, Any]) -> int:
    """Send `text` and exit 0 only once the broker acknowledged it."""

    def work() -> int:
        with Client(name, server, **security) as client:
            client.send(to, text, wait=True, timeout=ACK_TIMEOUT_S)
        return 0

    return reporting_failures(work)


def message_json(message: IncomingMessage) -> str:
    return json.dumps(
        {
            "id": message.id,
            "broker_id": message.broker_id,
            "from": message.sender,
            "text": message.text,
            "sent_at": message.sent_at,
            "accepted_at": message.accepted_at,
        },
        ensure_ascii=False,
    )


def install_stop_handler(stop: Callable[[int, object], None]) -> None:
    """Call `stop` on Ctrl-C and SIGTERM, and on Ctrl-Break on Windows (its consoles and
    service managers send no SIGTERM)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    if sys.platform == "win32":
        signal.signal(signal.SIGBREAK, stop)


def listen(
    server: str, name: str, as_json: bool, security: dict[str, Any], out: TextIO = sys.stdout
) -> int:
    """Print every incoming message (one JSON object per line with `as_json`) until
    SIGINT/SIGTERM (or Ctrl-Break on Windows, whose consoles send no SIGTERM)."""
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    install_stop_handler(stop)

    def work() -> int:
        try:
            with Client(name, server, **security) as client:
                print(f"listening as {client.name}", file=sys.stderr, flush=True)
                while not stopping:
                    message = client.receive(timeout=0.2)
                    if message is None:
                        continue
                    plain = f"{message.sender}: {message.text}"
                    line = message_json(message) if as_json else plain
                    out.write(line + "\n")
                    out.flush()
                    # Confirmed only once written out: killed before, it comes again.
                    client.confirm(message)
        except BrokenPipeError:
            # The reader left (`| head -1`): the line in hand was not delivered. Raised
            # through the `with`, which then leaves it unconfirmed, so it comes again;
            # leaving is not an error.
            discard_unwritten(out)
        return 0

    return reporting_failures(work)


def discard_unwritten(out: TextIO) -> None:
    """Point `out` at the null device, so that the text left in its buffer is not flushed
    again at exit (Python would print a BrokenPipeError for it)."""
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, out.fileno())
        os.close(null)


def send_lines(
    server: str, name: str, to: str, lines: Iterable[str], security: dict[str, Any]
) -> int:
    """Send each non-empty line as a message to `to`; exit 0 once all were accepted.

    Input is read only as answers come back (at most SEND_WINDOW lines await theirs),
    so any amount can be piped in without filling the SDK's outbox."""

    def work() -> int:
        with Client(name, server, **security) as client:
            # Message id -> its line number, for saying which line a refusal is about.
            pending: dict[str, int] = {}
            failed = 0

            def settle_one() -> bool:
                """Wait for the next answer to one of ours; False after a long silence."""
                nonlocal failed
                while True:
                    event = client.next_event(timeout=ACK_TIMEOUT_S)
                    if event is None:
                        return False
                    if isinstance(event, MessageAccepted | MessageFailed) and event.id in pending:
                        number = pending.pop(event.id)
                        if isinstance(event, MessageFailed):
                            failed += 1
                            print(f"mangogram: line {number}: {event.message}", file=sys.stderr)
                        return True

            for number, line in enumerate(lines, start=1):
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue
                while len(pending) >= SEND_WINDOW:
                    if not settle_one():
                        return not_acknowledged(len(pending))
                pending[client.send(to, text)] = number
            while pending:
                if not settle_one():
                    return not_acknowledged(len(pending))
            return 1 if failed else 0

    return reporting_failures(work)


def not_acknowledged(count: int) -> int:
    print(f"mangogram: {count} messages not acknowledged", file=sys.stderr)
    return 1
