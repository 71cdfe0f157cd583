"""Event loops that zmq.asyncio can use, on every platform.

zmq.asyncio watches its sockets with `add_reader`, which only selector event loops have.
Windows' default loop is the proactor one, which lacks it (pyzmq then falls back to a
helper thread and warns). Every asyncio entry point in MangoGram (the console client,
`Bot.run`) builds its loop with `new_event_loop` through `asyncio.Runner`: loop policies,
the older way to choose, are deprecated from Python 3.14.

Your own program that awaits `Bot.run_async()` should do the same:

    mangogram_proto.loops.run(bot.run_async())
    # or: with asyncio.Runner(loop_factory=mangogram_proto.loops.new_event_loop) as r: ...

Setting `MANGOGRAM_SELECT_LOOP=1` gives every platform the loop Windows gets (a selector
loop on `select()`), so the Windows path can be tested anywhere.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
SELECT_LOOP_ENV = "MANGOGRAM_SELECT_LOOP"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop zmq.asyncio works with: on Windows (or with MANGOGRAM_SELECT_LOOP=1) a
    selector loop on `select()`, elsewhere the platform's default selector loop."""
    if sys.platform == "win32" or os.environ.get(SELECT_LOOP_ENV) == "1":
        return asyncio.SelectorEventLoop(selectors.SelectSelector())
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a loop from `new_event_loop` (`asyncio.run`'s twin)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


__all__ = ["SELECT_LOOP_ENV", "new_event_loop", "run"]
