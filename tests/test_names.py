"""Names: normalization, collisions and refusals."""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

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


PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def documented_name_key_vectors() -> list[tuple[str, str, str, str]]:
    """The rows of the test-vector table in protocol.md's "The name key in Unicode terms":
    (name as shown, its code points, key as shown, the key's code points)."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    section = text.split("### The name key in Unicode terms", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1].startswith("U+"):
            rows.append((cells[0].strip("`"), cells[1], cells[2].strip("`"), cells[3]))
    return rows


def from_code_points(text: str) -> str:
    return "".join(chr(int(cp.removeprefix("U+"), 16)) for cp in text.split())


def test_the_documented_name_key_vectors_hold():
    rows = documented_name_key_vectors()
    assert len(rows) >= 15
    for shown, points, key_shown, key_points in rows:
        name, key = from_code_points(points), from_code_points(key_points)
        assert shown == name and key_shown == key, "the shown text must be its code points"
        assert name_key(name) == key, f"{points}: name_key gives {name_key(name)!r}"


def test_the_documented_unicode_version_is_the_one_in_use():
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    section = text.split("### The name key in Unicode terms", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"(\d+\.\d+\.\d+)\**\s+on\s+(?:Python\s+)?(\d+\.\d+)", section)
    versions = {python: unicode for unicode, python in documented}
    assert version in versions, f"protocol.md does not say which Unicode Python {version} uses"
    assert versions[version] == unicodedata.unidata_version
