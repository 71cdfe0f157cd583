"""Codec: every message round-trips, and every malformed frame set is refused clearly."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import types
import typing

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mangogram_proto import codec
from mangogram_proto.constants import SIGNATURE, SIGNATURE_V2
from mangogram_proto.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from mangogram_proto.messages import (
    BROKER_COMMANDS,
    CLIENT_COMMANDS,
    Deliver,
    Error,
    Ping,
    Presence,
    Send,
)

# Valid protocol strings: any Unicode scalar value (no lone surrogates).
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=50)
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def strategy_for(hint):
    """A strategy for values of a message field type."""
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        hints = typing.get_type_hints(hint)
        names = hint.__struct_fields__
        return st.builds(hint, **{name: strategy_for(hints[name]) for name in names})
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return st.builds(
            hint, **{f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(hint)}
        )
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(hint))
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        return st.lists(strategy_for(item), max_size=5).map(tuple)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return st.none() | strategy_for(inner)
    return {str: texts, int: ints, bool: st.booleans()}[hint]


@pytest.mark.parametrize("cls", CLIENT_COMMANDS + BROKER_COMMANDS, ids=lambda c: c.COMMAND)
@given(data=st.data())
def test_every_message_round_trips_in_both_framings(cls, data):
    message = data.draw(strategy_for(cls))
    (whole,) = codec.encode(message)  # version 3 by default: one frame
    head = SIGNATURE + cls.COMMAND.encode() + b" "
    assert whole.startswith(head)
    frames = codec.encode(message, 2)
    assert frames[0] == SIGNATURE_V2
    assert frames[1] == cls.COMMAND.encode()
    assert whole[len(head) :] == frames[2]  # the same body in both
    json.loads(frames[2].decode("utf-8"))  # the body is plain UTF-8 JSON
    assert codec.decode(frames) == message
    assert codec.decode([whole]) == message


def test_ukrainian_and_emoji_travel_as_utf8_not_escapes():
    message = Send("m1", "Олена", "Привіт, світе! 🥭 你好", 1)
    (body,) = codec.encode(message)
    assert "Привіт".encode() in body
    assert "🥭".encode() in body
    assert codec.decode(codec.encode(message)) == message


def test_optional_fields_may_be_absent_or_null():
    frames = [SIGNATURE_V2, b"ERROR", b'{"code":"x","message":"m","ref":null}']
    error = codec.decode(frames)
    assert error.ref is None and error.retry_after_ms is None


def test_unknown_fields_are_ignored_for_forward_compatibility():
    frames = [SIGNATURE_V2, b"PING", b'{"future":"field"}']
    assert codec.decode(frames).COMMAND == "PING"


def test_encoding_an_unpaired_surrogate_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        codec.encode(Send("m1", "bob", "bad \ud800 text", 1))


def good_send_body(**overrides):
    body = {"id": "m1", "to": "bob", "text": "hi", "sent_at": 1}
    body.update(overrides)
    return json.dumps(body).encode()


MALFORMED = [
    ("no frames", [], ErrorCode.MALFORMED),
    ("one frame", [SIGNATURE], ErrorCode.MALFORMED),
    ("two frames", [SIGNATURE_V2, b"PING"], ErrorCode.MALFORMED),
    ("four frames", [SIGNATURE_V2, b"PING", b"{}", b"{}"], ErrorCode.MALFORMED),
    ("wrong signature", [b"HTTP/1.1", b"PING", b"{}"], ErrorCode.MALFORMED),
    ("empty signature", [b"", b"PING", b"{}"], ErrorCode.MALFORMED),
    ("future version", [b"MGP04", b"PING", b"{}"], ErrorCode.UNSUPPORTED_VERSION),
    ("past version", [b"MGP01", b"PING", b"{}"], ErrorCode.UNSUPPORTED_VERSION),
    ("version 3 signature in three frames", [SIGNATURE, b"PING", b"{}"], ErrorCode.MALFORMED),
    ("unknown command", [SIGNATURE_V2, b"DANCE", b"{}"], ErrorCode.UNKNOWN_COMMAND),
    ("lowercase command", [SIGNATURE_V2, b"ping", b"{}"], ErrorCode.UNKNOWN_COMMAND),
    ("binary command", [SIGNATURE_V2, b"\xff\xfe", b"{}"], ErrorCode.UNKNOWN_COMMAND),
    ("invalid utf-8", [SIGNATURE_V2, b"PING", b'{"a":"\xff"}'], ErrorCode.MALFORMED),
    ("not json", [SIGNATURE_V2, b"PING", b"hello"], ErrorCode.MALFORMED),
    ("empty body", [SIGNATURE_V2, b"PING", b""], ErrorCode.MALFORMED),
    ("json array", [SIGNATURE_V2, b"PING", b"[]"], ErrorCode.MALFORMED),
    ("json string", [SIGNATURE_V2, b"PING", b'"x"'], ErrorCode.MALFORMED),
    ("NaN", [SIGNATURE_V2, b"SEND", good_send_body().replace(b"1}", b"NaN}")], ErrorCode.MALFORMED),
    ("deep nesting", [SIGNATURE_V2, b"PING", b"[" * 100_000], ErrorCode.MALFORMED),
    ("huge number", [SIGNATURE_V2, b"SEND", good_send_body(sent_at=10**30)], ErrorCode.MALFORMED),
    (
        "endless digits",
        [SIGNATURE_V2, b"SEND", b'{"id":"m","to":"b","text":"t","sent_at":' + b"9" * 5000 + b"}"],
        ErrorCode.MALFORMED,
    ),
    ("missing field", [SIGNATURE_V2, b"SEND", b'{"id":"m1","to":"bob"}'], ErrorCode.MALFORMED),
    ("text is a number", [SIGNATURE_V2, b"SEND", good_send_body(text=5)], ErrorCode.MALFORMED),
    ("id is null", [SIGNATURE_V2, b"SEND", good_send_body(id=None)], ErrorCode.MALFORMED),
    ("sent_at is bool", [SIGNATURE_V2, b"SEND", good_send_body(sent_at=True)], ErrorCode.MALFORMED),
    ("sent_at is float", [SIGNATURE_V2, b"SEND", good_send_body(sent_at=1.5)], ErrorCode.MALFORMED),
    ("to is a list", [SIGNATURE_V2, b"SEND", good_send_body(to=["bob"])], ErrorCode.MALFORMED),
    (
        "lone surrogate escape",
        [SIGNATURE_V2, b"SEND", good_send_body().replace(b'"hi"', b'"\\ud800"')],
        ErrorCode.MALFORMED,
    ),
    (
        "bad presence event",
        [SIGNATURE_V2, b"PRESENCE", b'{"name":"a","event":"danced","at":1}'],
        ErrorCode.MALFORMED,
    ),
    (
        "users not a list",
        [SIGNATURE_V2, b"ONLINE", b'{"users":"a","server_time":1}'],
        ErrorCode.MALFORMED,
    ),
]


@pytest.mark.parametrize(
    "frames,code", [(f, c) for _, f, c in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_frames_are_refused_with_a_code(frames, code):
    with pytest.raises(RemoteProtocolError) as caught:
        codec.decode(frames)
    assert caught.value.code is code
    assert caught.value.message


def test_oversized_body_is_too_large():
    frames = [SIGNATURE_V2, b"SEND", good_send_body(text="x" * 2000)]
    with pytest.raises(RemoteProtocolError) as caught:
        codec.decode(frames, max_body_bytes=1000)
    assert caught.value.code is ErrorCode.TOO_LARGE


def test_error_for_a_bad_send_names_the_message_id():
    with pytest.raises(RemoteProtocolError) as caught:
        codec.decode([SIGNATURE_V2, b"SEND", good_send_body(id="abc", text=5)])
    assert caught.value.ref == "abc"


@given(frames=st.lists(st.binary(max_size=64), max_size=5))
def test_arbitrary_bytes_never_escape_as_anything_but_remote_errors(frames):
    with contextlib.suppress(RemoteProtocolError):
        codec.decode(frames)


@given(
    body=st.dictionaries(
        texts,
        st.recursive(
            st.none() | st.booleans() | ints | texts,
            lambda c: st.lists(c) | st.dictionaries(texts, c),
            max_leaves=8,
        ),
    )
)
def test_arbitrary_json_bodies_decode_or_fail_cleanly(body):
    payload = json.dumps(body).encode()
    for cls in CLIENT_COMMANDS + BROKER_COMMANDS:
        with contextlib.suppress(RemoteProtocolError):
            codec.decode([SIGNATURE_V2, cls.COMMAND.encode(), payload])


def test_deliver_and_presence_examples():
    deliver = Deliver("m1", "b-1", "Олена", "Добрий день", 10, 11, 1, True)
    assert codec.decode(codec.encode(deliver)) == deliver
    assert codec.decode(codec.encode(Presence("Тарас", "left", 5))).event == "left"


def refusal(frames: list[bytes], max_body_bytes: int | None = None) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as caught:
        codec.decode(frames, max_body_bytes=max_body_bytes)
    return caught.value


@pytest.mark.parametrize(
    "frames,message",
    [
        (
            [b"MGP01", b"PING", b"{}"],
            'unsupported protocol "MGP01"; this peer speaks MGP03 and MGP02',
        ),
        ([SIGNATURE_V2, b"ping", b"{}"], 'unknown command "ping"'),
        ([b"GET /", b"PING", b"{}"], 'bad signature "GET /", expected "MGP03" or "MGP02"'),
        ([SIGNATURE_V2, b"PI\x00\x1bNG\xff", b"{}"], r'unknown command "PI\u{0}\u{1B}NG\xFF"'),
        ([SIGNATURE_V2, b"P\xe2\x80\xaeING", b"{}"], r'unknown command "P\u{202E}ING"'),
        ([SIGNATURE_V2, b'A"B\\', b"{}"], r'unknown command "A\"B\\"'),
        ([SIGNATURE_V2, "ПІНГ".encode(), b"{}"], 'unknown command "ПІНГ"'),
        ([SIGNATURE_V2, b"X" * 1000, b"{}"], 'unknown command "' + "X" * 32 + '"…'),
        (
            [SIGNATURE_V2, b"PING", b'{"a":"\xff"}'],
            "body is not UTF-8 (byte 6: invalid start byte)",
        ),
        (
            [SIGNATURE_V2, b"SEND", good_send_body(text=5)],
            "field 'text' must be string, got integer",
        ),
        (
            [SIGNATURE_V2, b"SEND", good_send_body(to=None, text=[])],
            "SEND: field 'to' is required",
        ),
        (
            [SIGNATURE_V2, b"PRESENCE", b'{"name":"a","event":"gone","at":1}'],
            'field \'event\' must be "joined" or "left", got string',
        ),
        (
            [SIGNATURE_V2, b"SEND", good_send_body(sent_at=1.5)],
            "field 'sent_at' must be integer, got number with a fraction or exponent",
        ),
    ],
)
def test_error_messages_are_plain_text_not_python_reprs(frames, message):
    assert refusal(frames).message == message


@given(frames=st.lists(st.binary(max_size=300), min_size=3, max_size=3))
def test_error_messages_stay_short_and_free_of_control_characters(frames):
    with contextlib.suppress(RemoteProtocolError):
        codec.decode(frames)
        return
    text = refusal(frames).message
    assert not re.search(r"(^|[\s(])b['\"]", text)  # no Python bytes repr
    assert all(ch == " " or ch.isprintable() for ch in text)
    assert len(text) < 400


# Repeated keys: refused, wherever they are, however the body is written.

REPEATS = [
    b'{"id":"a","id":"b","to":"bob","text":"x","sent_at":1}',
    b'{"id":"a","to":"bob","text":"12:30","sent_at":1,"to":"eve"}',
    b'{"id":"a","to":"bob","text":"x","sent_at":1,"extra":[{"k":1,"k":2}]}',
    b'{"id":"x","id":"\\u003a\\u003A","to":"bob","text":"x","sent_at":1}',  # escapes even it
    b'{"id":"a","to":"bob","text":"x","sent_at":1,"deep":'
    + b'{"a":' * 300
    + b'{"k":1,"k":1}'
    + b"}" * 300
    + b"}",
]


@pytest.mark.parametrize("body", REPEATS, ids=range(len(REPEATS)))
def test_a_repeated_key_is_malformed(body):
    error = refusal([SIGNATURE_V2, b"SEND", body])
    assert error.code is ErrorCode.MALFORMED
    assert error.message == "body repeats a key in one object"


def test_a_repeated_key_in_a_send_still_names_the_message():
    assert refusal([SIGNATURE_V2, b"SEND", REPEATS[1]]).ref == "a"


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":"a","to":"bob","text":"a:b:c","sent_at":1}',
        b'{"id":"a\\u003a","to":"bob","text":"::","sent_at":1}',
        b'{"id":"a","to":"bob","text":"x","sent_at":1,"extra":[{"k":1},{"k":2}],"k":3}',
        b'{"id":"a","to":"bob","text":"x","sent_at":1,"deep":' + b'{"a":' * 300 + b"1" + b"}" * 301,
    ],
)
def test_bodies_without_repeats_are_accepted(body):
    assert isinstance(codec.decode([SIGNATURE_V2, b"SEND", body]), Send)


# A JSON tree whose objects are lists of (key, value) pairs, so keys can repeat.
keys_with_colons = st.text(alphabet="ab:", min_size=1, max_size=3)
trees = st.recursive(
    st.integers(0, 9) | keys_with_colons,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(st.tuples(keys_with_colons, inner), max_size=4).map(lambda p: ("obj", p))
    ),
    max_leaves=12,
)


def render(tree, escape_colons: bool) -> str:
    """JSON text for `tree`, with ':' in strings written as \\u003a if asked."""
    if isinstance(tree, tuple):
        members = ",".join(
            f"{render(k, escape_colons)}:{render(v, escape_colons)}" for k, v in tree[1]
        )
        return "{" + members + "}"
    if isinstance(tree, list):
        return "[" + ",".join(render(item, escape_colons) for item in tree) + "]"
    if isinstance(tree, str):
        text = json.dumps(tree)
        return text.replace(":", "\\u003a") if escape_colons else text
    return json.dumps(tree)  # numbers, true, false


def repeats(tree) -> bool:
    if isinstance(tree, tuple):
        keys = [k for k, _ in tree[1]]
        return len(set(keys)) < len(keys) or any(repeats(v) for _, v in tree[1])
    if isinstance(tree, list):
        return any(repeats(item) for item in tree)
    return False


@given(members=st.lists(st.tuples(keys_with_colons, trees), max_size=5), escape=st.booleans())
def test_repeated_keys_are_found_exactly(members, escape):
    tree = ("obj", members)
    payload = render(tree, escape).encode()
    try:
        codec.decode([SIGNATURE_V2, b"PING", payload])
        refused = False
    except RemoteProtocolError as exc:
        assert exc.message == "body repeats a key in one object"
        refused = True
    assert refused == repeats(tree)


# Refusals of a SEND name it (ref) whenever an id can be read, even from a body that
# cannot be decoded.


def send_text(id_: str, text: str) -> bytes:
    return json.dumps({"id": id_, "to": "bob", "text": text, "sent_at": 1}).encode()


@pytest.mark.parametrize(
    "frames,max_body,ref",
    [
        ([SIGNATURE_V2, b"SEND", send_text("m-1", "x" * 3000)], 1000, "m-1"),
        (  # id last, after the text, and escaped
            [SIGNATURE_V2, b"SEND", b'{"text":"' + b"y" * 3000 + b'","id" : "m\\"2\\u00e9"}'],
            1000,
            'm"2é',
        ),
        ([SIGNATURE_V2, b"SEND", b'{"id":"m-3","text":"\xff"}'], None, "m-3"),  # not UTF-8
        ([SIGNATURE_V2, b"SEND", b'{"id":"m-4","text":'], None, "m-4"),  # not JSON
        ([SIGNATURE_V2, b"SEND", send_text("m-5", "x"), b"{}"], None, "m-5"),  # 4 frames
        ([SIGNATURE_V2, b"SEND", send_text("x" * 257, "x" * 3000)], 1000, None),  # too long
        ([SIGNATURE_V2, b"SEND", send_text("", "x" * 3000)], 1000, None),  # empty id
        ([SIGNATURE_V2, b"HISTORY", b'{"id":"m-6","peer":"' + b"x" * 3000 + b'"}'], 1000, None),
        (
            [SIGNATURE_V2, b"SEND", b'{"text":"\\"id\\":\\"fake\\"' + b"z" * 3000 + b'"}'],
            1000,
            None,
        ),
        ([SIGNATURE_V2, b"SEND", send_text("i" * 64, "x") + b"}"], None, "i" * 64),
        ([SIGNATURE_V2, b"SEND", send_text("🥭" * 256, "x" * 3000)], 1000, "🥭" * 256),
    ],
    ids=range(11),
)
def test_undecodable_send_bodies_still_name_the_message(frames, max_body, ref):
    assert refusal(frames, max_body).ref == ref


def test_a_field_error_names_ids_up_to_256_characters():
    assert refusal([SIGNATURE_V2, b"SEND", good_send_body(id="i" * 256, text=5)]).ref == "i" * 256
    assert refusal([SIGNATURE_V2, b"SEND", good_send_body(id="i" * 257, text=5)]).ref is None


@given(payload=st.binary(max_size=2000), text=st.text(max_size=300))
def test_finding_an_id_never_fails_and_returns_only_sendable_ids(payload, text):
    for body in (payload, b'{"id":' + json.dumps(text).encode() + payload):
        found = codec.find_id(body)
        assert found is None or (isinstance(found, str) and 0 < len(found) <= 256)
        if found is not None:
            codec.encode(Error("malformed", "m", ref=found))  # sendable as a ref


# Version 3: one frame, `MGP03` + command + one space + body.

V3_MALFORMED = [
    ("empty frame", [b""], ErrorCode.MALFORMED, "bad signature"),
    ("signature only", [b"MGP03"], ErrorCode.MALFORMED, "no space after the command"),
    ("no separator", [b"MGP03PING"], ErrorCode.MALFORMED, "no space after the command"),
    ("no separator, a body", [b"MGP03PING{}"], ErrorCode.MALFORMED, "no space after the command"),
    ("empty command", [b"MGP03 {}"], ErrorCode.MALFORMED, "no command before the space"),
    ("command too long", [b"MGP03" + b"X" * 33 + b" {}"], ErrorCode.MALFORMED, "no space after"),
    ("unknown command", [b"MGP03DANCE {}"], ErrorCode.UNKNOWN_COMMAND, 'unknown command "DANCE"'),
    ("lowercase command", [b"MGP03ping {}"], ErrorCode.UNKNOWN_COMMAND, "unknown command"),
    ("two spaces", [b"MGP03PING  {}"], None, None),  # JSON may start with whitespace
    ("tab separator", [b"MGP03PING\t{}"], ErrorCode.MALFORMED, "no space after the command"),
    ("empty body", [b"MGP03PING "], ErrorCode.MALFORMED, "body is not valid JSON"),
    ("trailing bytes", [b"MGP03PING {} x"], ErrorCode.MALFORMED, "body is not valid JSON"),
    ("trailing object", [b"MGP03PING {}{}"], ErrorCode.MALFORMED, "body is not valid JSON"),
    ("body an array", [b"MGP03PING []"], ErrorCode.MALFORMED, "body must be a JSON object"),
    ("not UTF-8", [b'MGP03PING {"a":"\xff"}'], ErrorCode.MALFORMED, "body is not UTF-8"),
    ("extra frame", [b"MGP03PING {}", b""], ErrorCode.MALFORMED, "one frame, got 2"),
    ("v3 signature, v2 shape", [SIGNATURE, b"PING", b"{}"], ErrorCode.MALFORMED, "one frame"),
    ("v2 signature, one frame", [b"MGP02PING {}"], ErrorCode.MALFORMED, "expected 3 frames"),
    ("v2 signature alone", [SIGNATURE_V2], ErrorCode.MALFORMED, "expected 3 frames"),
    ("future version", [b"MGP04PING {}"], ErrorCode.UNSUPPORTED_VERSION, '"MGP04"'),
    ("old version", [b"MGP01PING {}"], ErrorCode.UNSUPPORTED_VERSION, "speaks MGP03 and MGP02"),
    ("not MGP", [b"HTTP/1.1 200"], ErrorCode.MALFORMED, 'bad signature "HTTP/1.1 200"'),
]


@pytest.mark.parametrize(
    "frames,code,words", [m[1:] for m in V3_MALFORMED], ids=[m[0] for m in V3_MALFORMED]
)
def test_every_malformed_v3_shape_gets_its_code(frames, code, words):
    if code is None:
        assert codec.decode(frames).COMMAND == "PING"
        return
    error = refusal(frames)
    assert error.code is code
    assert words in error.message


def test_the_v3_login_example_bytes():
    (whole,) = codec.encode(Send("m1", "bob", "hi", 1))
    assert whole == b'MGP03SEND {"id":"m1","to":"bob","text":"hi","sent_at":1}'


def test_a_v3_send_with_extra_frames_or_too_large_still_names_itself():
    (whole,) = codec.encode(Send("m-7", "bob", "x" * 3000, 1))
    assert refusal([whole, b"more"]).ref == "m-7"
    assert refusal([whole], max_body_bytes=1000).ref == "m-7"
    assert refusal([whole], max_body_bytes=1000).code is ErrorCode.TOO_LARGE


def test_max_body_bytes_counts_the_body_not_the_frame():
    (whole,) = codec.encode(Ping())
    assert whole == b"MGP03PING {}"
    assert codec.decode([whole], max_body_bytes=2).COMMAND == "PING"
    assert refusal([whole], max_body_bytes=1).code is ErrorCode.TOO_LARGE


def test_command_of_and_version_of_read_both_framings():
    (whole,) = codec.encode(Ping())
    assert codec.command_of([whole]) == b"PING"
    assert codec.command_of(codec.encode(Ping(), 2)) == b"PING"
    assert codec.command_of([b"MGP03PING"]) == b""
    assert codec.command_of([b"XXXXXPING {}"]) == b""
    assert codec.command_of([]) == b""
    assert codec.version_of([whole]) == 3
    assert codec.version_of(codec.encode(Ping(), 2)) == 2
    assert codec.version_of([b"MGP01", b"PING", b"{}"]) == 2
    assert codec.version_of([b"MGP01PING {}"]) == 3
    assert codec.version_of([b"MGP03", b"PING", b"{}"]) == 3
    assert codec.version_of([b"MGP02PING {}"]) == 2
    assert codec.version_of([b"GET /"]) is None
    assert codec.version_of([]) is None


@given(frame=st.binary(max_size=80))
def test_arbitrary_single_frames_never_escape_as_anything_but_remote_errors(frame):
    for whole in (frame, SIGNATURE + frame, SIGNATURE + b"SEND " + frame):
        with contextlib.suppress(RemoteProtocolError):
            codec.decode([whole])


@given(members=st.lists(st.tuples(keys_with_colons, trees), max_size=5), escape=st.booleans())
def test_repeated_keys_are_found_exactly_in_v3_sends_too(members, escape):
    """A SEND's known fields plus random extra members: the fast proof never lets a
    repeat through and the exact check decides the rest."""
    known = [("id", "a:1"), ("to", "b"), ("text", "12:30"), ("sent_at", 1)]
    tree = ("obj", [(k, v) for k, v in known] + members)
    payload = render(tree, escape).encode()
    try:
        codec.decode([SIGNATURE + b"SEND " + payload])
        refused = False
    except RemoteProtocolError as exc:
        if exc.message != "body repeats a key in one object":
            return  # an extra member re-typed a known field: some other refusal
        refused = True
    assert refused == repeats(tree)


@pytest.mark.parametrize(
    "frames,message",
    [
        (
            [b'MGP03ONLINE {"users":["a",null],"server_time":1}'],
            "field 'users[1]' must be string, got null",
        ),
        (
            [b'MGP03ONLINE {"users":["a"],"server_time":null}'],
            "ONLINE: field 'server_time' is required",
        ),
        (
            [b'MGP03LOGIN {"name":"a","resume_from":"x"}'],
            "field 'resume_from' must be integer or null, got string",
        ),
        (
            [b'MGP03HISTORY_PAGE {"peer":"a","more":true,"items":[{"broker_id":"1"}]}'],
            "HISTORY_PAGE: field 'items[0].id' is required",
        ),
        (
            [b'MGP03SEND {"id":"a","to":"b","text":"c","sent_at":9223372036854775808}'],
            "field 'sent_at' is outside the 64-bit range",
        ),
        ([b'MGP03RECEIPT {"seq":true}'], "field 'seq' must be integer, got true"),
        ([b'MGP03RECEIPT {"seq":"1"}'], "field 'seq' must be integer, got string"),
        (
            [b'MGP03DELIVERED {"to":"a","delivered_at":1,"ids":"x","broker_ids":[]}'],
            "field 'ids' must be array, got string",
        ),
    ],
)
def test_validation_errors_in_our_words(frames, message):
    assert refusal(frames).message == message


@given(
    members=st.lists(
        st.tuples(
            st.sampled_from(["delayed", "seq", "a", "a:", 'x"delayed']),
            st.integers(0, 9) | st.booleans() | trees,
        ),
        max_size=4,
    ),
    delayed=st.sampled_from([None, False, True]),
)
def test_repeated_keys_are_found_exactly_in_delivers_with_delayed_written_or_not(members, delayed):
    """DELIVER's `delayed` may be absent or written with its default: the fast proof
    counts it from the raw body and must never let a repeat through."""
    known = [
        ("id", "a"),
        ("broker_id", "1"),
        ("sender", "s:1"),
        ("text", "t"),
        ("sent_at", 1),
        ("accepted_at", 2),
        ("seq", 3),
    ]
    if delayed is not None:
        known.append(("delayed", delayed))
    tree = ("obj", known + members)
    payload = render(tree, False).encode()
    try:
        codec.decode([SIGNATURE + b"DELIVER " + payload])
        refused = False
    except RemoteProtocolError as exc:
        if exc.message != "body repeats a key in one object":
            return  # a member re-typed a known field: some other refusal
        refused = True
    assert refused == repeats(tree)


DELIVER_FIELDS = b'"id":"a","broker_id":"1","sender":"s","text":"t","sent_at":1,"accepted_at":2'


@pytest.mark.parametrize(
    "body,repeated",
    [
        (b"{" + DELIVER_FIELDS + b',"seq":3}', False),
        (b"{" + DELIVER_FIELDS + b',"seq":3,"delayed":false}', False),
        (b"{" + DELIVER_FIELDS + b',"seq":3,"seq":4}', True),  # delayed absent
        (b"{" + DELIVER_FIELDS + b',"seq":3,"delayed":false,"delayed":false}', True),
        (b"{" + DELIVER_FIELDS + b',"seq":3,"delayed":true,"delayed":false}', True),
        (b"{" + DELIVER_FIELDS + b',"seq":3,"x":{"delayed":1},"seq":3}', True),
        (b"{" + DELIVER_FIELDS + b',"seq":3,"x":{"delayed":1}}', False),
    ],
)
def test_delayed_written_or_absent_never_hides_a_repeat(body, repeated):
    frames = [SIGNATURE + b"DELIVER " + body]
    if repeated:
        assert refusal(frames).message == "body repeats a key in one object"
    else:
        assert isinstance(codec.decode(frames), Deliver)


@pytest.mark.parametrize("first", [b"MGP02X", b"MGP03X", b"MGP02 "])
def test_a_spoken_signature_with_bytes_glued_on_is_malformed_not_another_version(first):
    with pytest.raises(RemoteProtocolError) as refused:
        codec.decode([first, b"PING", b"{}"])
    assert refused.value.code == ErrorCode.MALFORMED
