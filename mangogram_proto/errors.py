"""Protocol errors: stable wire codes, and exceptions that say whose fault they are.

`RemoteProtocolError` means the peer broke the protocol (answer it with `to_error()`);
`LocalProtocolError` means this program tried to build something invalid (fix the caller).
"""

from __future__ import annotations

from enum import StrEnum


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
