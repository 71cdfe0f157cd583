"""The event loop every asyncio entry point uses, and the one Windows gets."""

from __future__ import annotations

import asyncio
import selectors
import sys
from pathlib import Path

import pytest

from mangogram_proto import loops


def selector_of(loop: asyncio.AbstractEventLoop) -> selectors.BaseSelector | None:
    return getattr(loop, "_selector", None)


def test_windows_gets_a_select_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    loop = loops.new_event_loop()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)
        assert isinstance(selector_of(loop), selectors.SelectSelector)
    finally:
        loop.close()


def test_the_windows_loop_can_be_asked_for_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loops.SELECT_LOOP_ENV, "1")
    loop = loops.new_event_loop()
    try:
        assert isinstance(selector_of(loop), selectors.SelectSelector)
    finally:
        loop.close()


def test_run_runs_on_a_loop_from_the_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loops.SELECT_LOOP_ENV, "1")

    async def which_selector() -> str:
        return type(selector_of(asyncio.get_running_loop())).__name__

    assert loops.run(which_selector()) == "SelectSelector"


def test_no_entry_point_builds_its_loop_another_way() -> None:
    """asyncio.run() would give Windows its proactor loop; policies are deprecated."""
    root = Path(__file__).resolve().parent.parent
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for folder in ("mangogram_proto", "mangogram_client", "examples", "tests")
        for path in sorted((root / folder).rglob("*.py"))
        if path.name not in {"loops.py", "test_loops.py"}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        # (bot.py keeps use_selector_loop_on_windows, a policy setter, for old callers)
        if "asyncio.run(" in line or ("set_event_loop_policy" in line and path.name != "bot.py")
    ]
    assert offenders == [], offenders
