"""Emoji widths that rich, prompt_toolkit and the terminal agree on.

rich 15 measures grapheme clusters: a thumbs-up with a skin-tone modifier (👍🏽) counts
2 cells, the modifier 0. prompt_toolkit measures code point by code point with wcwidth:
4 cells. Many terminals (tmux 3.3, xterm, VTE, the Windows console) draw the two code
points side by side, 4 cells, so rich's rows came out 2 cells wider than it thought and
wrapped, leaving a blank line after the message. `install()` makes rich count a
skin-tone modifier as 2 cells, as prompt_toolkit does and those terminals draw; where a
terminal joins the pair into one 2-cell glyph the row is merely 2 cells short, which
never wraps.

An emoji variation selector (U+FE0F) after a character that is narrow by default (❤️,
☺️) makes rich count 2 cells where prompt_toolkit and tmux count 1. `display_text`
drops such selectors, so every side counts 1 and the terminal draws the character in its
default presentation. Selectors inside joined sequences (🏳️‍🌈) are kept: rich, tmux
and modern terminals all take the joined sequence as one 2-cell glyph.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import rich.cells
import rich.segment
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.layout.processors import Processor, Transformation, TransformationInput
from prompt_toolkit.layout.utils import explode_text_fragments

SKIN_TONES = range(0x1F3FB, 0x1F400)
# FE0F not followed by a zero-width joiner (so not inside a ZWJ sequence).
_LONE_EMOJI_SELECTOR = re.compile("\ufe0f(?!\u200d)")


def display_text(text: str) -> str:
    """`text` with the emoji variation selectors whose width terminals disagree on removed."""
    return _LONE_EMOJI_SELECTOR.sub("", text)


def install() -> None:
    """Make rich count skin-tone modifiers as 2 cells (see the module notes); idempotent."""
    original: Callable[..., int] = rich.cells.get_character_cell_size
    if getattr(original, "mangogram_widths", False):
        return

    @functools.lru_cache(maxsize=4096)
    def cell_size(character: str, unicode_version: str = "auto") -> int:
        if ord(character) in SKIN_TONES:
            return 2
        return original(character, unicode_version)

    cell_size.mangogram_widths = True  # type: ignore[attr-defined]
    # rich looks the function up in these two modules; measurements cached before now
    # would disagree with it.
    for module in (rich.cells, rich.segment):
        setattr(module, "get_character_cell_size", cell_size)  # noqa: B010
    rich.cells.cached_cell_len.cache_clear()


ZWJ = "\u200d"
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)


class InputAsDrawn(Processor):
    """Show the input line so that prompt_toolkit's cell count is what the terminal draws.

    prompt_toolkit places the input code point by code point (wcwidth): a ZWJ sequence
    (👨‍👩‍👧) is 6 cells to it and a flag (🇺🇦) 4, while tmux and modern terminals
    draw each as one 2-cell glyph, so the cursor would sit past the text. In the input
    line only (the text sent is unchanged), joiners are left out, so the sequence shows
    as its parts, which every terminal draws as prompt_toolkit counts them, and a flag's
    regional indicators show as its two letters (🇺🇦 as UA)."""

    def apply_transformation(self, transformation_input: TransformationInput) -> Transformation:
        fragments = explode_text_fragments(transformation_input.fragments)
        out: StyleAndTextTuples = []
        source_to_display: list[int] = []
        for fragment in fragments:
            style, char = fragment[0], fragment[1]
            source_to_display.append(len(out))
            if char == ZWJ:
                continue
            if len(char) == 1 and ord(char) in REGIONAL_INDICATORS:
                char = chr(ord("A") + ord(char) - REGIONAL_INDICATORS.start)
            # Mouse handlers (a third item) stay, so a click still places the cursor.
            out.append((style, char, *fragment[2:]))
        display_to_source = [0] * (len(out) + 1)
        for source, display in reversed(list(enumerate(source_to_display))):
            display_to_source[display] = source
        display_to_source[len(out)] = len(source_to_display)
        end = len(out)

        def to_display(i: int) -> int:
            return (
                source_to_display[i]
                if i < len(source_to_display)
                else end + i - len(source_to_display)
            )

        def to_source(i: int) -> int:
            return display_to_source[i] if i <= end else len(source_to_display) + i - end

        return Transformation(out, to_display, to_source)
