"""Names: normalization, collisions and refusals."""

from __future__ import annotations

import pytest

from mangogram_proto.errors import ErrorCode, RemoteProtocolError
from mangogram_proto.names import name_key, validate_name


@pytest.mark.parametrize(
    "a,b",
    [
        ("Олена", "олена"),
        ("ОЛЕНА", "олена"),
        ("Straße", "STRASSE"),
        ("ﬁsh", "fish"),  # compatibility ligature
        ("Café", "Cafe\u0301"),  # precomposed vs combining accent
        ("ＢＯＢ", "bob"),  # fullwidth letters
    ],
)
def test_names_that_look_the_same_collide(a, b):
    assert name_key(a) == name_key(b)


def test_display_form_is_kept_in_nfc():
    assert validate_name("Cafe\u0301") == "Café"
    assert validate_name("Олена") == "Олена"


@pytest.mark.parametrize(
    "name",
    ["Олена", "taras_2", "李小龍", "🥭mango", "Zoë", "o'brien", "a" * 32],
)
def test_good_names_are_accepted(name):
    assert validate_name(name)


@pytest.mark.parametrize(
    "name,reason",
    [
        ("", "empty"),
        (" ", "space"),
        ("two words", "space"),
        ("tab\there", "space"),
        ("nl\n", "space"),
        ("zero\u200bwidth", "invisible"),
        ("rtl\u202eoverride", "invisible"),
        ("bell\x07", "invisible"),
        ("a" * 33, "at most 32"),
        ("@bob", "@"),
        ("/exit", "/"),
        ("\ue000private", "invisible"),
    ],
)
def test_bad_names_are_refused_with_a_reason(name, reason):
    with pytest.raises(RemoteProtocolError) as caught:
        validate_name(name)
    assert caught.value.code is ErrorCode.NAME_INVALID
    assert reason in caught.value.message
