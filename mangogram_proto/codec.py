"""Encode messages to ZeroMQ frames and decode frames back, validating everything.

Two framings (docs/protocol.md, section 2):

* version 3, one frame: `MGP03`, the command name in ASCII, one space, the UTF-8 JSON
  body: `MGP03PING {}`;
* version 2, three frames: `MGP02`, the command name, the body. Still served by the
  broker; `decode` tells the two apart by the first frame.

Bodies are decoded and validated by msgspec straight into the message structs
(messages.py): strict types, no coercion, integers within 64 bits. Unknown fields are
ignored so newer peers can add optional ones; optional fields may be absent or null. A
key repeated in any object is refused, as is a body that is not UTF-8 throughout.
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import orjson

from .constants import (
    FRAME_COUNT_V2,
    MAX_COMMAND_BYTES,
    MAX_REF_CHARS,
    PROTOCOL_VERSION,
    SEPARATOR,
    SIGNATURE,
    SIGNATURE_PREFIX,
    SIGNATURE_V2,
)
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError, printable
from .messages import BROKER_COMMANDS, CLIENT_COMMANDS, Message, Welcome, WireStruct

Version = Literal[2, 3]

_SIGNATURE_BYTES = len(SIGNATURE)
_HEAD = SIGNATURE  # what a version 3 frame starts with
_SEND = b"SEND"
_COMMAND_END = _SIGNATURE_BYTES + MAX_COMMAND_BYTES + 1  # where a separator may be last
_SPOKEN = f"{SIGNATURE.decode()} and {SIGNATURE_V2.decode()}"

_ENCODER = msgspec.json.Encoder()
_encode_json = _ENCODER.encode


# Encoding


def encode(message: Message, version: Version = PROTOCOL_VERSION) -> list[bytes]:
    """Turn a message into the frames to send, in framing `version` (3: one frame).

    Raises:
        LocalProtocolError: a field holds a value the protocol cannot carry (our bug).
    """
    cls = type(message)
    body = encode_body(message)
    if version == 3:
        return [_V3_HEADS[cls] + body]
    return [SIGNATURE_V2, _COMMAND_BYTES[cls], body]


def encode_parts(message: Message) -> tuple[bytes, bytes]:
    """The command name and the JSON body of a message, to be framed by `frame`: a
    sender with peers of both framings encodes the body once.

    Raises:
        LocalProtocolError: a field holds a value the protocol cannot carry (our bug).
    """
    return _COMMAND_BYTES[type(message)], encode_body(message)


def encode_body(value: WireStruct) -> bytes:
    """The JSON body of a message (or of a `HistoryItem`): compact UTF-8, fields in
    declaration order, None-valued optional fields left out.

    Raises:
        LocalProtocolError: a field holds a value the protocol cannot carry (our bug).
    """
    try:
        if type(value) is not Welcome:
            # `omit_defaults` leaves None out; refuses lone surrogates.
            return _encode_json(value)
        # Its `online` is written even when empty (as ever); only None is left out.
        return _encode_json(
            {
                name: field
                for name in value.__struct_fields__
                if (field := getattr(value, name)) is not None
            }
        )
    except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        raise LocalProtocolError(ErrorCode.MALFORMED, f"cannot encode {value!r}: {exc}") from exc


def frame(command: bytes, body: bytes, version: Version = PROTOCOL_VERSION) -> list[bytes]:
    """The frames of a message in framing `version`."""
    if version == 3:
        head = _V3_HEADS_BY_COMMAND.get(command) or _HEAD + command + SEPARATOR
        return [head + body]
    return [SIGNATURE_V2, command, body]


# Framing


def version_of(frames: list[bytes]) -> Version | None:
    """The framing a message names, for answering its sender in it: 3 if its first frame
    starts with `MGP03`, 2 if with `MGP02`; for another `MGP` version, 3 for one frame
    and 2 for more; None if it does not start with `MGP` at all."""
    first = frames[0] if frames else b""
    if first.startswith(_HEAD):
        return 3
    if first.startswith(SIGNATURE_V2):
        return 2
    if first.startswith(SIGNATURE_PREFIX):
        return 3 if len(frames) == 1 else 2
    return None


def command_of(frames: list[bytes]) -> bytes:
    """The command name a message carries in either framing, without checking anything
    else (b"" if none can be read): for choosing how to handle it before decoding."""
    if len(frames) == 1:
        whole = frames[0]
        end = whole.find(SEPARATOR, _SIGNATURE_BYTES, _COMMAND_END)
        return whole[_SIGNATURE_BYTES:end] if end > 0 and whole.startswith(_HEAD) else b""
    return frames[1] if len(frames) > 1 else b""


def split(frames: list[bytes]) -> tuple[bytes, bytes]:
    """The command name and body of a message in either framing.

    Raises:
        RemoteProtocolError: the framing is broken (`malformed`), names another protocol
            version (`unsupported_version`) or no command (`malformed`).
    """
    if len(frames) == 1:
        whole = frames[0]
        if whole.startswith(_HEAD):
            # The command ends at the first space; it is at most MAX_COMMAND_BYTES long.
            end = whole.find(SEPARATOR, _SIGNATURE_BYTES, _COMMAND_END)
            if end > _SIGNATURE_BYTES:
                return whole[_SIGNATURE_BYTES:end], whole[end + 1 :]
            if end == _SIGNATURE_BYTES:
                raise RemoteProtocolError(ErrorCode.MALFORMED, "no command before the space")
            raise RemoteProtocolError(
                ErrorCode.MALFORMED,
                f"no space after the command within {MAX_COMMAND_BYTES} bytes of"
                f" {SIGNATURE.decode()}",
            )
        if whole[:_SIGNATURE_BYTES] == SIGNATURE_V2:
            raise RemoteProtocolError(
                ErrorCode.MALFORMED,
                f"expected {FRAME_COUNT_V2} frames, got 1",
            )
        _refuse_signature(whole)
    if len(frames) == FRAME_COUNT_V2 and frames[0] == SIGNATURE_V2:
        return frames[1], frames[2]
    first = frames[0] if frames else b""
    if first == SIGNATURE_V2:
        # A SEND with surplus frames can still name itself, so its sender can stop resending.
        ref = find_id(frames[2]) if len(frames) > FRAME_COUNT_V2 and frames[1] == _SEND else None
        raise RemoteProtocolError(
            ErrorCode.MALFORMED, f"expected {FRAME_COUNT_V2} frames, got {len(frames)}", ref
        )
    if first.startswith(_HEAD):
        ref = find_id(first) if first.startswith(_HEAD + _SEND + SEPARATOR) else None
        raise RemoteProtocolError(
            ErrorCode.MALFORMED,
            f"a {SIGNATURE.decode()} message is one frame, got {len(frames)}",
            ref,
        )
    _refuse_signature(first)
    raise AssertionError("unreachable")  # pragma: no cover


def _refuse_signature(signature: bytes) -> typing.NoReturn:
    # A version spoken here with bytes glued on (`MGP02X` in a frame of its own) is not
    # another version: calling it unsupported would name a version this peer speaks.
    spoken = signature[:_SIGNATURE_BYTES] in (SIGNATURE, SIGNATURE_V2)
    if signature.startswith(SIGNATURE_PREFIX) and not spoken:
        raise RemoteProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"unsupported protocol {printable(signature[:_SIGNATURE_BYTES], 16)};"
            f" this peer speaks {_SPOKEN}",
        )
    raise RemoteProtocolError(
        ErrorCode.MALFORMED,
        f"bad signature {printable(signature[:16], 16)},"
        f" expected {printable(SIGNATURE)} or {printable(SIGNATURE_V2)}",
    )


# Decoding


def decode(frames: list[bytes], max_body_bytes: int | None = None) -> Message:
    """Parse one message, in either framing.

    Raises:
        RemoteProtocolError: the frames are not a valid message; its `code` says why
            and `ref` carries the message id when one could be read.
    """
    if len(frames) == 1:  # version 3's usual case, without the detour through `split`
        whole = frames[0]
        end = whole.find(SEPARATOR, _SIGNATURE_BYTES, _COMMAND_END)
        if end > _SIGNATURE_BYTES and whole.startswith(_HEAD):
            return decode_body(whole[_SIGNATURE_BYTES:end], whole[end + 1 :], max_body_bytes)
    command, payload = split(frames)
    return decode_body(command, payload, max_body_bytes)


def decode_body(command: bytes, payload: bytes, max_body_bytes: int | None = None) -> Message:
    """Parse and validate the body of a `command` message.

    Raises:
        RemoteProtocolError: as `decode`.
    """
    plan = _PLANS.get(command)
    if plan is None:
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
        message: Message = plan.decoder(payload)
    except (msgspec.MsgspecError, RecursionError) as exc:
        # Rare: find the first problem in the documented order, in our words.
        raise _explain(plan, payload, exc) from None
    # The common case, proven at once: no more colons than required fields (a body of
    # known fields only, no ":" in its strings; see `_Plan.proven_unique`).
    colons = payload.count(b":")
    if colons > plan.required and not plan.proven_unique(message, payload, colons):
        # A key may repeat, or an unknown field may hold what msgspec skipped without
        # reading (it checks UTF-8 only in the fields it decodes): orjson reads it all.
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise _explain(plan, payload, None) from None
        repeated = _repeated_key(payload, body)
        if repeated is not None:
            raise RemoteProtocolError(ErrorCode.MALFORMED, repeated, _body_ref(body))
    return message


class _Plan:
    """How to decode and check one command's body, worked out once."""

    def __init__(self, cls: type[Message]) -> None:
        self.cls = cls
        self.command = cls.COMMAND
        self.decoder: Callable[[bytes], Any] = msgspec.json.Decoder(cls).decode
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = msgspec.structs.fields(cls)
        self.hints = {f.name: hints[f.name] for f in fields}
        # For proving a body has no repeated key (see `proven_unique`).
        self.required = sum(f.required for f in fields)
        # Whether the encoder writes fields at their default, and the fields that may be
        # at their default yet written in a body: (name, default, the key as the broker
        # writes it, `"delayed":`). None is never written when defaults are left out.
        self.writes_defaults = 0 if cls.__struct_config__.omit_defaults else 1
        self.defaulted = tuple(
            (
                f.name,
                f.default if f.default_factory is msgspec.NODEFAULT else f.default_factory(),
                b'"%s":' % f.name.encode(),
            )
            for f in fields
            if not f.required and (f.default is not None or self.writes_defaults)
        )

    def proven_unique(self, message: Message, payload: bytes, colons: int) -> bool:
        """True if `payload`, which decoded to `message` and holds `colons` colons,
        cannot repeat a key; False if it may (then the exact check decides).

        Every member of an object has one ":" outside strings, and, unless a colon is
        escaped (\\u003a), every ":" in a decoded string is one in `payload`. `message`
        written back (None and default values left out) has one ":" per field that held
        a value, at every depth (each one a distinct member of `payload`), plus the
        colons of its strings. So if `payload` has no more colons than that, it has no
        member beyond its distinct known keys: no repeat, at any depth, and no unknown
        member, so every string in it is one msgspec decoded (and checked for UTF-8).

        A field at its default (`delayed` false) may be absent or written out. Each
        `"delayed":` in the raw body is a member of its own (an unescaped quote after
        `delayed` closes a string, and a string followed by ":" is a key), with the key
        `delayed` or one ending in `\\"delayed`, so it is counted as one; found twice, it
        may be a repeat, and the exact check decides."""
        present = self.required  # distinct members known to be in `payload`
        adjust = 0  # what writing `message` back gets wrong about such fields
        for name, default, key in self.defaulted:
            if getattr(message, name) != default:
                present += 1
                continue
            written = payload.count(key)
            if written > 1:
                return False
            present += written
            adjust += written - self.writes_defaults
        if colons <= present:
            return True  # DELIVER as the broker writes it, without ":" in its strings
        if b"\\u003" in payload:
            return False
        return colons <= _encode_json(message).count(b":") + adjust


def _strip(hint: Any) -> Any:
    """`hint` without Annotated metadata and without `| None`."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    args = typing.get_args(hint)
    if type(None) in args:
        (hint,) = [a for a in args if a is not type(None)]
        return _strip(hint)
    return hint


_COMMANDS: tuple[type[Message], ...] = (*CLIENT_COMMANDS, *BROKER_COMMANDS)
_COMMAND_BYTES: dict[type, bytes] = {cls: cls.COMMAND.encode("ascii") for cls in _COMMANDS}
# What a version 3 frame of each command starts with: b"MGP03SEND ".
_V3_HEADS: dict[type, bytes] = {
    cls: _HEAD + command + SEPARATOR for cls, command in _COMMAND_BYTES.items()
}
_V3_HEADS_BY_COMMAND: dict[bytes, bytes] = {
    command: _V3_HEADS[cls] for cls, command in _COMMAND_BYTES.items()
}
_PLANS: dict[bytes, _Plan] = {cls.COMMAND.encode("ascii"): _Plan(cls) for cls in _COMMANDS}


def _explain(plan: _Plan, payload: bytes, failure: Exception | None) -> RemoteProtocolError:
    """The error for a body msgspec refused (`failure`), or that is not UTF-8 throughout
    (None), naming the first problem in the documented order: UTF-8 and JSON syntax →
    object → repeated key → fields."""
    ref_if_send = find_id(payload) if plan.command == "SEND" else None
    try:
        # orjson validates UTF-8 and refuses lone surrogates, NaN and nesting beyond 1024.
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as bad:
            return RemoteProtocolError(
                ErrorCode.MALFORMED,
                f"body is not UTF-8 (byte {bad.start}: {bad.reason})",
                ref_if_send,
            )
        return RemoteProtocolError(
            ErrorCode.MALFORMED, f"body is not valid JSON: {exc}", ref_if_send
        )
    if not isinstance(body, dict):
        return RemoteProtocolError(ErrorCode.MALFORMED, "body must be a JSON object", ref_if_send)
    ref = _body_ref(body)
    repeated = _repeated_key(payload, body)
    if repeated is not None:
        return RemoteProtocolError(ErrorCode.MALFORMED, repeated, ref)
    if isinstance(failure, msgspec.ValidationError):
        return RemoteProtocolError(ErrorCode.MALFORMED, _field_error(plan, body, str(failure)), ref)
    if isinstance(failure, RecursionError):
        return RemoteProtocolError(ErrorCode.MALFORMED, "body is nested too deeply", ref)
    # orjson read what msgspec did not (or the reverse): say what msgspec said.
    return RemoteProtocolError(ErrorCode.MALFORMED, f"body is not valid JSON: {failure}", ref)


def _body_ref(body: dict[str, Any]) -> str | None:
    # The ref is echoed back in ERROR, so it must itself be sendable and small.
    ref = body.get("id")
    if not isinstance(ref, str) or not 0 < len(ref) <= MAX_REF_CHARS:
        return None
    return ref


# msgspec's ValidationError texts, e.g. "Expected `int`, got `str` - at `$.sent_at`".
_AT = r"(?: - at `\$(?P<path>[^`]*)`)?$"
_MISSING = re.compile(r"Object missing required field `(?P<name>[^`]+)`" + _AT)
_EXPECTED = re.compile(r"Expected `(?P<type>[^`]+)`, got `[^`]+`" + _AT)
_RANGE = re.compile(r"Expected `int` [<>]=? -?\d+" + _AT)
_ENUM = re.compile(r"Invalid enum value .*?" + _AT)
_TYPE_WORDS = {
    "int": "integer",
    "str": "string",
    "bool": "true or false",
    "object": "object",
    "array": "array",
}


def _field_error(plan: _Plan, body: dict[str, Any], failure: str) -> str:
    """msgspec's complaint about a field, in our words: "field 'seq' must be integer,
    got string", "SEND: field 'to' is required"."""
    if found := _MISSING.match(failure):
        where = _where(found["path"], found["name"])
        return f"{plan.command}: field '{where}' is required"
    if found := _RANGE.match(failure):
        return f"field '{_where(found['path'])}' is outside the 64-bit range"
    path = None
    if found := _EXPECTED.match(failure):
        path = found["path"]
        value = _at(body, path)
        if value is None and path and not path.endswith("]"):
            # null for a required field: the same as absent.
            return f"{plan.command}: field '{_where(path)}' is required"
        if path is None or path == "":
            return "body must be a JSON object"
        expected = " or ".join(
            _TYPE_WORDS.get(word, word) for word in found["type"].replace(" | ", "|").split("|")
        )
        return f"field '{_where(path)}' must be {expected}, got {_json_type(value)}"
    if found := _ENUM.match(failure):
        path = found["path"]
        hint = _strip(plan.hints.get((path or "").lstrip("."), Any))
        allowed = (
            " or ".join(printable(a) for a in typing.get_args(hint))
            if typing.get_origin(hint) is Literal
            else "one of the allowed values"
        )
        return f"field '{_where(path)}' must be {allowed}, got {_json_type(_at(body, path))}"
    return failure.replace("`", "'")  # still plain text; no case of ours reaches it


def _where(path: str | None, name: str | None = None) -> str:
    """A field's place for an error message: `sent_at`, `items[0].sent_at`."""
    where = (path or "").lstrip(".")
    if name is not None:
        where = f"{where}.{name}" if where else name
    return where


_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _at(body: Any, path: str | None) -> Any:
    """The value at msgspec's `path` (".items[0].sent_at") in the decoded body."""
    value = body
    for key, index in _STEP.findall(path or ""):
        try:
            value = value[int(index)] if index else value[key]
        except (KeyError, IndexError, TypeError):
            return None
    return value


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


# Repeated keys


def _repeated_key(payload: bytes, body: dict[str, Any]) -> str | None:
    """Why `payload` must be refused if an object in it names a key twice (JSON decoders
    keep the last one silently, so two readers could see two different messages), else
    None.

    Counting colons instead of parsing again: every member of an object has one ":"
    outside strings, and, unless a colon is written as the escape \\u003a, every ":"
    inside a string is one in the decoded string. orjson writes the decoded body back
    with the same colons, less one per repeated member and those in its strings. So a
    repeat shows as fewer colons in the re-encoded body than in `payload`.
    """
    colons = payload.count(b":")
    if colons == len(body):
        # A flat body with no ":" in its strings: nothing can be missing.
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


# Refs of undecodable SENDs

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
