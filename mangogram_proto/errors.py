"""Protocol errors: stable wire codes, and exceptions that say whose fault they are.

`RemoteProtocolError` means the peer broke the protocol (answer it with `to_error()`);
`LocalProtocolError` means this program tried to build something invalid (fix the caller).
"""

from __future__ import annotations

import unicodedata
from enum import StrEnum

# Code points that would hide, fake or break how a message looks: controls, format
# characters (bidi overrides, zero-width joiners), surrogates, private use, unassigned,
# and line or paragraph separators. Spaces other than U+0020 are escaped too.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})


def printable(data: bytes | str, limit: int = 64) -> str:
    """`data` in double quotes, fit for an error message that any program may show.

    Text is shown as it is, except `"` and `\\` (escaped with a backslash), code points
    that are invisible or control the display (as `\\u{1B}`, `\\u{202E}`), and, in
    bytes, whatever is not UTF-8 (as `\\xFF`). At most `limit` characters of `data` are
    shown; more is marked with `…` after the closing quote. Work is bounded by `limit`,
    not by the size of `data`.
    """
    if isinstance(data, bytes):
        # A character is at most 4 bytes: this slice holds `limit` whole characters.
        text = data[: 4 * limit + 4].decode("utf-8", errors="surrogateescape")
        cut = len(data) > 4 * limit + 4 or len(text) > limit
        from_bytes = True
    else:
        text = data[: limit + 1]
        cut = len(data) > limit
        from_bytes = False
    shown = []
    for char in text[:limit]:
        point = ord(char)
        if char in '"\\':
            shown.append("\\" + char)
        elif from_bytes and 0xDC80 <= point <= 0xDCFF:  # a byte that is not UTF-8
            shown.append(f"\\x{point - 0xDC00:02X}")
        elif char != " " and unicodedata.category(char) in _ESCAPED_CATEGORIES:
            shown.append(f"\\u{{{point:X}}}")
        else:
            shown.append(char)
    return '"' + "".join(shown) + '"' + ("…" if cut else "")


class ErrorCode(StrEnum):
    """Machine-readable codes carried by the ERROR message. Never renamed once published."""

    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_COMMAND = "unknown_command"
    TOO_LARGE = "too_large"
    NOT_LOGGED_IN = "not_logged_in"
    ALREADY_LOGGED_IN = "already_logged_in"
    NAME_INVALID = "name_invalid"
    NAME_TAKEN = "name_taken"
    NAME_OWNED = "name_owned"
    SERVER_FULL = "server_full"
    UNKNOWN_RECIPIENT = "unknown_recipient"
    MAILBOX_FULL = "mailbox_full"
    RATE_LIMITED = "rate_limited"
    ROUTING_ID_REFUSED = "routing_id_refused"
    UNAVAILABLE = "unavailable"
    TAKEN_OVER = "taken_over"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """Base class for protocol violations.

    Args:
        code: the stable error code to report.
        message: a human-readable explanation.
        ref: the client message id the error refers to, if any.
    """

    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid. Reply with an ERROR (or drop it) and keep serving."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something invalid: a bug or bad input in the calling program."""


class BrokerRefused(ProtocolError):
    """The broker answered a request with an ERROR (login refused, message not accepted).

    `code` says why; `retry_after_ms` is set for `rate_limited`.
    """

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        ref: str | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        try:
            known = ErrorCode(code)
        except ValueError:
            known = ErrorCode.INTERNAL
        super().__init__(known, f"{code}: {message}", ref)
        self.wire_code = str(code.value if isinstance(code, ErrorCode) else code)
        self.retry_after_ms = retry_after_ms


class UnsentMessagesError(TimeoutError):
    """`Client.close()` gave up waiting for texts the broker had not yet answered.

    `ids` names them, oldest first. The client is closed all the same; each of them was
    sent at most as far as the socket, and may or may not have been stored."""

    def __init__(self, ids: list[str], timeout: float) -> None:
        super().__init__(
            f"{len(ids)} message(s) not accepted by the broker within {timeout} s of closing:"
            f" {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}"
        )
        self.ids = ids
