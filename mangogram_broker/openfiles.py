"""Lift the soft open-file limit so thousands of clients fit (POSIX; nothing to do elsewhere).

Every client holds one descriptor. Linux's usual soft limit (1024) and macOS's (256) are far
below what a broker serves, so at start we ask for `WANTED_OPEN_FILES`, bounded by the hard
limit. macOS refuses any soft limit above `kern.maxfilesperproc` with EINVAL even when the
hard limit reads "unlimited"; there we retry with `MACOS_FALLBACK`, the value its own
`OPEN_MAX` names and every macOS accepts.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

WANTED_OPEN_FILES = 65_536
MACOS_FALLBACK = 10_240


def raise_open_file_limit(resource: Any = None) -> int | None:
    """Raise the soft RLIMIT_NOFILE; return the limit now in force (None on Windows).

    Args:
        resource: the `resource` module, or a stand-in with the same four names (tests).
    """
    if resource is None:
        if sys.platform == "win32":
            return None  # no rlimits: Windows sockets are not bounded by a descriptor table
        import resource as posix_resource

        resource = posix_resource
    soft, hard = (int(value) for value in resource.getrlimit(resource.RLIMIT_NOFILE))
    unlimited = int(resource.RLIM_INFINITY)
    if soft == unlimited:
        return soft
    wanted = WANTED_OPEN_FILES if hard == unlimited else min(hard, WANTED_OPEN_FILES)
    fallback = MACOS_FALLBACK if hard == unlimited else min(hard, MACOS_FALLBACK)
    for target in dict.fromkeys((wanted, fallback)):
        if soft >= target:
            return soft
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("open-file limit %d refused: %s", target, exc)
            continue
        log.debug("open-file limit raised from %d to %d", soft, target)
        return target
    log.warning("could not raise the open-file limit from %d", soft)
    return soft
