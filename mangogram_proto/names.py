"""User names: what is allowed, and when two names are the same name.

Two names collide when their keys are equal: NFKC normalization plus Unicode case
folding, so "Олена", "олена" and "ОЛЕНА" are one user, as are "ﬁsh" and "fish".
The display form the user typed (NFC-normalized) is what others see.
"""

from __future__ import annotations

import unicodedata

from .constants import MAX_NAME_CHARS
from .errors import ErrorCode, RemoteProtocolError, printable

# Control, format, surrogate, private-use and unassigned code points can hide or fake
# what a name looks like, so none are allowed.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
# "@" starts a mention and "/" a command in the console client.
_FORBIDDEN_CHARS = frozenset("@/")


def name_key(name: str) -> str:
    """The comparison key of a name: equal keys mean the same user."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def validate_name(name: str, max_chars: int = MAX_NAME_CHARS) -> str:
    """Check a requested name and return its display form (NFC).

    Raises:
        RemoteProtocolError: with code `name_invalid` and a reason a person can act on.
    """
    display = unicodedata.normalize("NFC", name)
    if not display:
        raise _invalid("name is empty")
    if len(display) > max_chars:
        raise _invalid(f"name is {len(display)} characters, at most {max_chars} allowed")
    for char in display:
        if char.isspace() or unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            raise _invalid(f"name contains a space or invisible character (U+{ord(char):04X})")
        if char in _FORBIDDEN_CHARS:
            raise _invalid(f"name must not contain {printable(char)}")
    if not name_key(display):
        raise _invalid("name is empty after normalization")
    return display


def _invalid(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.NAME_INVALID, reason)
