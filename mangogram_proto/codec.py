"""Encode messages to ZeroMQ frames and decode frames back, validating everything.

Wire form: exactly three frames — the signature (`MGP01`), the command name in ASCII,
and a UTF-8 JSON object holding the message fields. Unknown fields are ignored so newer
peers can add optional ones; optional fields may be absent or null.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, TypeVar, Union

from .constants import FRAME_COUNT, SIGNATURE, SIGNATURE_PREFIX
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .messages import BROKER_COMMANDS, CLIENT_COMMANDS, Message

_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1

_COMMANDS: dict[bytes, type[Message]] = {
    cls.COMMAND.encode("ascii"): cls for cls in (*CLIENT_COMMANDS, *BROKER_COMMANDS)
}

T = TypeVar("T")


def encode(message: Message) -> list[bytes]:
    """Turn a message into the frames to send.

    Raises:
        LocalProtocolError: a field holds a value the protocol cannot carry (our bug).
    """
    body = _to_json_value(message)
    try:
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        payload = data.encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise LocalProtocolError(ErrorCode.MALFORMED, f"cannot encode {message!r}: {exc}") from exc
    return [SIGNATURE, message.COMMAND.encode("ascii"), payload]


def decode(frames: list[bytes], max_body_bytes: int | None = None) -> Message:
    """Parse one multipart message.

    Raises:
        RemoteProtocolError: the frames are not a valid message; its `code` says why
            and `ref` carries the message id when one could be read.
    """
    if len(frames) != FRAME_COUNT:
        raise RemoteProtocolError(
            ErrorCode.MALFORMED, f"expected {FRAME_COUNT} frames, got {len(frames)}"
        )
    signature, command, payload = frames
    if signature != SIGNATURE:
        if signature.startswith(SIGNATURE_PREFIX):
            raise RemoteProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"unsupported protocol {signature[:16]!r}; this peer speaks {SIGNATURE.decode()}",
            )
        raise RemoteProtocolError(
            ErrorCode.MALFORMED, f"bad signature {signature[:16]!r}, expected {SIGNATURE!r}"
        )
    cls = _COMMANDS.get(command)
    if cls is None:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {command[:32]!r}")
    if max_body_bytes is not None and len(payload) > max_body_bytes:
        raise RemoteProtocolError(
            ErrorCode.TOO_LARGE, f"body is {len(payload)} bytes, limit is {max_body_bytes}"
        )
    try:
        text = payload.decode("utf-8")
        body = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"body is not UTF-8: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "body must be a JSON object")
    ref = body.get("id") if isinstance(body.get("id"), str) else None
    try:
        return _from_json_object(cls, body)
    except RemoteProtocolError as exc:
        exc.ref = _safe_ref(ref)
        raise


def _safe_ref(ref: str | None) -> str | None:
    # The ref is echoed back in ERROR, so it must itself be sendable.
    if ref is None or len(ref) > 256 or _has_surrogate(ref):
        return None
    return ref


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _to_json_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: _to_json_value(getattr(value, field.name))
            for field in dataclasses.fields(value)
            if getattr(value, field.name) is not None
        }
    if isinstance(value, tuple | list):
        return [_to_json_value(item) for item in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _from_json_object(cls: type[T], body: dict[str, Any]) -> T:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name not in body or body[field.name] is None:
            has_default = (
                field.default is not dataclasses.MISSING
                or field.default_factory is not dataclasses.MISSING
            )
            if has_default:
                continue
            raise RemoteProtocolError(
                ErrorCode.MALFORMED, f"{cls.__name__}: field '{field.name}' is required"
            )
        kwargs[field.name] = _convert(hints[field.name], body[field.name], field.name)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, where)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise _type_error(where, " or ".join(repr(a) for a in allowed), value)
        return value
    if origin is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list):
            raise _type_error(where, "array", value)
        return tuple(_convert(item_hint, item, f"{where}[]") for item in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(where, "true or false", value)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(where, "string", value)
        if _has_surrogate(value):
            raise RemoteProtocolError(
                ErrorCode.MALFORMED, f"field '{where}' holds an unpaired surrogate"
            )
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(where, "integer", value)
        if not _INT_MIN <= value <= _INT_MAX:
            raise RemoteProtocolError(
                ErrorCode.MALFORMED, f"field '{where}' is outside the 64-bit range"
            )
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _type_error(where, "object", value)
        return _from_json_object(hint, value)  # type: ignore[arg-type]
    raise LocalProtocolError(ErrorCode.INTERNAL, f"codec cannot handle type {hint!r}")


def _type_error(where: str, expected: str, value: Any) -> RemoteProtocolError:
    return RemoteProtocolError(
        ErrorCode.MALFORMED, f"field '{where}' must be {expected}, got {type(value).__name__}"
    )
