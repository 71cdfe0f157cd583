"""The codec as it was before msgspec and protocol 3 (orjson and hand-written
validation into frozen dataclasses, three frames), kept only as the baseline of
bench/decode_cost.py. Not used by the broker or the SDK.

Wire form: exactly three frames — the signature (`MGP02`), the command name in ASCII,
and a UTF-8 JSON object holding the message fields. Unknown fields are ignored so newer
peers can add optional ones; optional fields may be absent or null.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union

import orjson

from mangogram_proto.constants import MAX_REF_CHARS, SIGNATURE_PREFIX, SIGNATURE_V2
from mangogram_proto.errors import ErrorCode, LocalProtocolError, RemoteProtocolError, printable

from .messages import BROKER_COMMANDS, CLIENT_COMMANDS, Message

SIGNATURE = SIGNATURE_V2
FRAME_COUNT = 3
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
    command, names, plain, nested = _shape(type(message))
    body: Any
    if plain:
        # No field can be None (absent on the wire), so orjson can walk the dataclass
        # itself, in field order: the hot path (DELIVER, ACCEPTED, DELIVERED), 5x faster.
        body = message
    elif nested:
        body = _to_json_value(message)
    else:
        # Flat messages: tuples of strings serialize as JSON arrays as they are.
        body = {n: v for n in names if (v := getattr(message, n)) is not None}
    try:
        # orjson: compact UTF-8 straight to bytes; refuses lone surrogates and ints beyond
        # 64 bits. The stdlib encoder was the broker's largest JSON cost in profiles.
        payload = orjson.dumps(body)
    except TypeError as exc:
        raise LocalProtocolError(ErrorCode.MALFORMED, f"cannot encode {message!r}: {exc}") from exc
    return [SIGNATURE, command, payload]


_SHAPES: dict[type, tuple[bytes, tuple[str, ...], bool, bool]] = {}


def _shape(cls: type) -> tuple[bytes, tuple[str, ...], bool, bool]:
    """A message class's command frame, field names, whether it is plain (no optional
    field, nothing nested) and whether it nests objects."""
    shape = _SHAPES.get(cls)
    if shape is None:
        every_hint = typing.get_type_hints(cls)  # also holds the COMMAND ClassVar
        hints = {f.name: every_hint[f.name] for f in dataclasses.fields(cls)}
        nested = any(
            dataclasses.is_dataclass(h)
            or any(dataclasses.is_dataclass(a) for a in typing.get_args(h))
            for h in hints.values()
        )
        optional = any(type(None) in typing.get_args(h) for h in hints.values())
        names = tuple(hints)
        command = cls.COMMAND.encode("ascii")  # type: ignore[attr-defined]
        shape = _SHAPES[cls] = (command, names, not (nested or optional), nested)
    return shape


def decode(frames: list[bytes], max_body_bytes: int | None = None) -> Message:
    """Parse one multipart message.

    Raises:
        RemoteProtocolError: the frames are not a valid message; its `code` says why
            and `ref` carries the message id when one could be read.
    """
    if len(frames) != FRAME_COUNT:
        # A SEND with surplus frames can still name itself, so its sender can stop resending.
        ref = (
            find_id(frames[2])
            if len(frames) > FRAME_COUNT and frames[:2] == [SIGNATURE, _SEND]
            else None
        )
        raise RemoteProtocolError(
            ErrorCode.MALFORMED, f"expected {FRAME_COUNT} frames, got {len(frames)}", ref
        )
    signature, command, payload = frames
    if signature != SIGNATURE:
        if signature.startswith(SIGNATURE_PREFIX):
            raise RemoteProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"unsupported protocol {printable(signature, 16)};"
                f" this peer speaks {SIGNATURE.decode()}",
            )
        raise RemoteProtocolError(
            ErrorCode.MALFORMED,
            f"bad signature {printable(signature, 16)}, expected {printable(SIGNATURE)}",
        )
    cls = _COMMANDS.get(command)
    if cls is None:
        raise RemoteProtocolError(
            ErrorCode.UNKNOWN_COMMAND, f"unknown command {printable(command, 32)}"
        )
    if max_body_bytes is not None and len(payload) > max_body_bytes:
        raise RemoteProtocolError(
            ErrorCode.TOO_LARGE,
            f"body is {len(payload)} bytes, limit is {max_body_bytes}",
            find_id(payload) if command == _SEND else None,
        )
    try:
        # orjson validates UTF-8 and refuses lone surrogates, NaN and nesting beyond 1024.
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        ref = find_id(payload) if command == _SEND else None
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise RemoteProtocolError(
                ErrorCode.MALFORMED, f"body is not UTF-8 (byte {bad.start}: {bad.reason})", ref
            ) from exc
        raise RemoteProtocolError(
            ErrorCode.MALFORMED, f"body is not valid JSON: {exc}", ref
        ) from exc
    if not isinstance(body, dict):
        raise RemoteProtocolError(
            ErrorCode.MALFORMED,
            "body must be a JSON object",
            find_id(payload) if command == _SEND else None,
        )
    ref = body.get("id") if isinstance(body.get("id"), str) else None
    repeated = _repeated_key(payload, body)
    if repeated is not None:
        raise RemoteProtocolError(ErrorCode.MALFORMED, repeated, _safe_ref(ref))
    try:
        return _from_json_object(cls, body)
    except RemoteProtocolError as exc:
        exc.ref = _safe_ref(ref)
        raise


def _repeated_key(payload: bytes, body: dict[str, Any]) -> str | None:
    """Why `payload` must be refused if an object in it names a key twice (orjson keeps
    the last one silently, so two readers could see two different messages), else None.

    Counting colons instead of parsing again: every member of an object has one ":"
    outside strings, and, unless a colon is written as the escape \\u003a, every ":"
    inside a string is one in the decoded string. orjson writes the decoded body back
    with the same colons, less one per repeated member and those in its strings. So a
    repeat shows as fewer colons in the re-encoded body than in `payload`.
    """
    colons = payload.count(b":")
    if colons == len(body):
        # The usual flat body with no ":" in its strings: nothing can be missing.
        return None
    try:
        again = orjson.dumps(body).count(b":")
    except TypeError:  # nested deeper than orjson writes (254 levels)
        return _repeated_key_by_parsing(payload)
    if again < colons:
        return _REPEATED  # members went missing (an escaped colon can only hide this)
    # Equal counts prove it unless an escaped colon ("\\u003a" or "\\u003A") evened them.
    return _repeated_key_by_parsing(payload) if b"\\u003" in payload else None


_REPEATED = "body repeats a key in one object"


def _refuse_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError(_REPEATED)
    return found


def _repeated_key_by_parsing(payload: bytes) -> str | None:
    """The slow, exact check, for the rare body that escapes a colon or nests deeply."""
    try:
        json.loads(payload, object_pairs_hook=_refuse_repeats)
    except ValueError:
        return _REPEATED
    except RecursionError:
        return "body is nested too deeply"
    return None


def _safe_ref(ref: str | None) -> str | None:
    # The ref is echoed back in ERROR, so it must itself be sendable and small.
    if ref is None or not 0 < len(ref) <= MAX_REF_CHARS:
        return None
    return ref


_SEND = b"SEND"
# `"id"`, then JSON whitespace, a colon, whitespace and the quote that opens the value.
_ID_KEY = re.compile(rb'"id"[ \t\n\r]*:[ \t\n\r]*"')
ID_CANDIDATES = 8
# The longest JSON text of a MAX_REF_CHARS string: every character beyond U+FFFF
# escaped as a surrogate pair, \\uD83E\\uDD6D (12 bytes).
_MAX_ID_TEXT = 12 * MAX_REF_CHARS


def find_id(payload: bytes) -> str | None:
    """The message id in a SEND body that cannot be decoded (too large, not UTF-8, not
    JSON), found without parsing the body, so that the refusal can name the message.

    It is the value of the first `"id"` key (written without escapes) whose value is a
    valid JSON string of 1 to MAX_REF_CHARS characters. Work is bounded whatever the
    body holds: one C-speed search per candidate, at most ID_CANDIDATES candidates,
    each read for at most _MAX_ID_TEXT bytes.
    """
    position = 0
    for _ in range(ID_CANDIDATES):
        found = _ID_KEY.search(payload, position)
        if found is None:
            return None
        start = found.end()  # just after the opening quote
        end = _closing_quote(payload, start, min(len(payload), start + _MAX_ID_TEXT + 1))
        if end is not None:
            try:
                value = orjson.loads(payload[start - 1 : end + 1])  # checks escapes, UTF-8
            except orjson.JSONDecodeError:
                value = None
            if isinstance(value, str) and 0 < len(value) <= MAX_REF_CHARS:
                return value
        position = start
    return None


def _closing_quote(payload: bytes, start: int, limit: int) -> int | None:
    """Where the JSON string opened just before `start` ends (its unescaped `"`), if
    before `limit`."""
    at = start
    while True:
        quote = payload.find(b'"', at, limit)
        if quote < 0:
            return None
        backslashes = 0
        while quote - backslashes > start and payload[quote - backslashes - 1] == 0x5C:
            backslashes += 1
        if backslashes % 2 == 0:
            return quote
        at = quote + 1


def _to_json_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: _to_json_value(getattr(value, field.name))
            for field in dataclasses.fields(value)
            if getattr(value, field.name) is not None
        }
    if isinstance(value, tuple | list):
        if all(type(item) is str for item in value):
            return value  # names (WELCOME, ONLINE): orjson writes a tuple as an array
        return [_to_json_value(item) for item in value]
    return value


Converter = Callable[[Any, str], Any]
_PLANS: dict[type, tuple[tuple[str, bool, Converter], ...]] = {}


def _plan(cls: type) -> tuple[tuple[str, bool, Converter], ...]:
    """How to read each field of `cls`: (name, required, converter), built once."""
    plan = _PLANS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        plan = tuple(
            (
                field.name,
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING,
                _converter(hints[field.name]),
            )
            for field in dataclasses.fields(cls)
        )
        _PLANS[cls] = plan
    return plan


def _from_json_object(cls: type[T], body: dict[str, Any]) -> T:
    kwargs: dict[str, Any] = {}
    for name, required, convert in _plan(cls):
        value = body.get(name)
        if value is None:
            if required:
                what = getattr(cls, "COMMAND", cls.__name__)  # SEND, not Send
                raise RemoteProtocolError(
                    ErrorCode.MALFORMED, f"{what}: field '{name}' is required"
                )
            continue
        kwargs[name] = convert(value, name)
    return cls(**kwargs)


def _converter(hint: Any) -> Converter:
    """A function that checks one JSON value against `hint` and returns the field value."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _converter(inner)
    if origin is Literal:
        allowed = typing.get_args(hint)

        def literal(value: Any, where: str) -> Any:
            if value not in allowed:
                raise _type_error(where, " or ".join(printable(a) for a in allowed), value)
            return value

        return literal
    if origin is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        item = _converter(item_hint)

        def array(value: Any, where: str) -> Any:
            if not isinstance(value, list):
                raise _type_error(where, "array", value)
            return tuple(item(v, f"{where}[]") for v in value)

        return array
    if hint is bool:
        return _boolean
    if hint is str:
        return _string
    if hint is int:
        return _integer
    if dataclasses.is_dataclass(hint):
        cls = hint

        def obj(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise _type_error(where, "object", value)
            return _from_json_object(cls, value)  # type: ignore[arg-type]

        return obj
    raise LocalProtocolError(ErrorCode.INTERNAL, f"codec cannot handle type {hint!r}")


def _boolean(value: Any, where: str) -> Any:
    if not isinstance(value, bool):
        raise _type_error(where, "true or false", value)
    return value


def _string(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        raise _type_error(where, "string", value)
    return value


def _integer(value: Any, where: str) -> Any:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _type_error(where, "integer", value)
    if not _INT_MIN <= value <= _INT_MAX:
        raise RemoteProtocolError(
            ErrorCode.MALFORMED, f"field '{where}' is outside the 64-bit range"
        )
    return value


def _type_error(where: str, expected: str, value: Any) -> RemoteProtocolError:
    return RemoteProtocolError(
        ErrorCode.MALFORMED, f"field '{where}' must be {expected}, got {_json_type(value)}"
    )


def _json_type(value: Any) -> str:
    """What a decoded JSON value is, in JSON's words (not Python's)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number with a fraction or exponent"
    if isinstance(value, list):
        return "array"
    return "object"
