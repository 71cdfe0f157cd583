"""Settings from MANGOGRAM_* environment variables, read strictly: a value that is not
understood is an error naming the variable, never a guess. (A guess can be dangerous:
`MANGOGRAM_INSECURE_PLAINTEXT=false` once turned plaintext on.)"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import printable

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class SettingError(ValueError):
    """An environment variable (or an option) holds a value that is not understood.
    The message names it and says what is allowed: show it to the user."""


def parse_bool(name: str, raw: str) -> bool:
    """`raw` as a yes/no setting: 1/true/yes/on or 0/false/no/off, in any case.

    Raises:
        SettingError: anything else, the empty string included.
    """
    word = raw.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingError(
        f"{name}={printable(raw, 32)} is not understood: use one of"
        f" {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)} (or leave it unset)"
    )


def env_bool(name: str, environ: Mapping[str, str] | None = None) -> bool | None:
    """The yes/no setting in environment variable `name`; None when it is not set.

    Raises:
        SettingError: it is set to anything but the words `parse_bool` knows.
    """
    raw = (os.environ if environ is None else environ).get(name)
    return None if raw is None else parse_bool(name, raw)


def env_key(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A key in environment variable `name`; None when it is not set.

    Raises:
        SettingError: it is set but empty. An empty key usually means a variable that
            expanded to nothing, and treating it as unset would silently fall back to
            trusting whatever key the network announces.
    """
    raw = (os.environ if environ is None else environ).get(name)
    if raw is not None and not raw.strip():
        raise SettingError(f"{name} is set but empty; give the key or unset {name}")
    return raw
