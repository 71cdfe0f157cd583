"""Rendering transcript lines: pure, into a colourless in-memory console."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.color import Color, ColorSystem
from rich.console import Console
from rich.style import Style

from mangogram_client.lines import ChatLine, Line, SystemLine
from mangogram_client.render import (
    NAME_PALETTE,
    DateRule,
    TranscriptRenderer,
    name_style,
    render_plain,
    safe_text,
)

ROOT = Path(__file__).resolve().parent.parent
PLUS2 = timezone(timedelta(hours=2))
ME = "Олена"
UKRAINIAN = (
    "Щастя — це коли тебе розуміють, велике щастя — коли тебе люблять, справжнє щастя — "
    "коли любиш ти. Ґава їсть їжачків, а Євген пʼє ряжанку на подвірʼї біля старої груші."
)


def at(hour: int, minute: int, second: int = 0, day: int = 24) -> int:
    """Milliseconds since the epoch for 2026-11-`day` hour:minute:second at UTC+2."""
    return int(datetime(2026, 11, day, hour, minute, second, tzinfo=PLUS2).timestamp() * 1000)


def incoming(text: str, when: int | None = None, sender: str = "Тарас", **kw: bool) -> ChatLine:
    return ChatLine(at(10, 0) if when is None else when, sender, sender, text, own=False, **kw)


def own(text: str, mark: str = "sent", peer: str = "Тарас", **kw: bool) -> ChatLine:
    return ChatLine(at(10, 0), ME, peer, text, own=True, mark=mark, **kw)  # type: ignore[arg-type]


def rows(lines: list[Line], width: int = 60, me: str = ME) -> list[str]:
    """The printed rows, the date rule included."""
    return render_plain(lines, me, width=width, tz=PLUS2).splitlines()


def body_rows(lines: list[Line], width: int = 60) -> list[str]:
    """The printed rows without date rules."""
    return [row for row in rows(lines, width) if not row.startswith("─")]


def console(width: int = 60, **kw: object) -> Console:
    return Console(file=io.StringIO(), width=width, color_system=None, **kw)  # type: ignore[arg-type]


def styles_of(char: str, line: Line) -> list[Style]:
    """The styles rich gives to segments containing `char` when `line` is rendered."""
    con = Console(file=io.StringIO(), width=60, color_system="truecolor", force_terminal=True)
    found = []
    for renderable in TranscriptRenderer(ME, tz=PLUS2).render(line):
        for segment in con.render(renderable):
            if char in segment.text and segment.style is not None:
                found.append(segment.style)
    return found


# --- time column and date rule ------------------------------------------------------


def test_time_column_shows_the_instant_in_the_given_zone():
    utc_0800 = int(datetime(2026, 11, 24, 8, 0, tzinfo=UTC).timestamp() * 1000)
    (row,) = body_rows([incoming("привіт", when=utc_0800)])
    assert row.startswith("10:00 Тарас привіт")


def test_time_column_follows_a_named_zone_across_daylight_saving():
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        kyiv = zoneinfo.ZoneInfo("Europe/Kyiv")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no tz database for Europe/Kyiv")
    winter = int(datetime(2026, 1, 10, 12, 0, tzinfo=UTC).timestamp() * 1000)
    summer = int(datetime(2026, 7, 10, 12, 0, tzinfo=UTC).timestamp() * 1000)
    text = render_plain([incoming("a", when=winter), incoming("b", when=summer)], ME, tz=kyiv)
    assert "14:00 Тарас a" in text
    assert "15:00 Тарас b" in text


def test_date_rule_comes_first_and_names_the_local_day():
    lines = rows([incoming("привіт", when=at(10, 0))])
    assert "Tuesday, 24 November 2026" in lines[0]
    assert lines[0].startswith("─") and lines[0].endswith("─")
    assert lines[1].startswith("10:00")


def test_date_rule_only_when_the_local_day_changes():
    lines = rows(
        [
            incoming("one", when=at(9, 0)),
            incoming("two", when=at(12, 0)),
            incoming("three", when=at(23, 59)),
            incoming("four", when=at(0, 1, day=25)),
            incoming("five", when=at(8, 0, day=25)),
        ]
    )
    rules = [row for row in lines if row.startswith("─")]
    assert len(rules) == 2
    assert "Tuesday, 24 November 2026" in rules[0]
    assert "Wednesday, 25 November 2026" in rules[1]
    assert lines.index(rules[1]) == lines.index(next(r for r in lines if "four" in r)) - 1


def test_day_boundary_is_the_viewers_not_utcs():
    # 23:30 UTC on the 24th is already 01:30 on the 25th at UTC+2.
    late_utc = int(datetime(2026, 11, 24, 23, 30, tzinfo=UTC).timestamp() * 1000)
    lines = rows([incoming("a", when=at(22, 0)), incoming("b", when=late_utc)])
    assert "Wednesday, 25 November 2026" in lines[2]
    assert lines[3].startswith("01:30")


def test_render_returns_the_rule_then_the_row():
    renderer = TranscriptRenderer(ME, tz=PLUS2)
    first = renderer.render(incoming("a"))
    second = renderer.render(incoming("b", when=at(10, 5)))
    assert len(first) == 2 and isinstance(first[0], DateRule)
    assert len(second) == 1


@pytest.mark.parametrize(
    "width,title",
    [(80, "Tuesday, 24 November 2026"), (24, "Tue 24 Nov 2026"), (14, "2026-11-24")],
)
def test_date_rule_shortens_the_day_name_to_fit(width, title):
    (rule,) = [row for row in rows([incoming("a")], width=width) if row.startswith("─")]
    assert f" {title} " in rule
    assert cell_len(rule) == width


# --- repeated times -------------------------------------------------------------------


def test_repeated_minute_is_blanked():
    lines = body_rows(
        [
            incoming("one", when=at(10, 0, 5)),
            own("two"),  # 10:00:00, the same minute
            SystemLine(at(10, 0, 59), "three"),
            incoming("four", when=at(10, 1)),
        ]
    )
    assert lines[0].startswith("10:00 Тарас one")
    assert lines[1].startswith("      Олена two")
    assert lines[2].startswith("      · three")
    assert lines[3].startswith("10:01 Тарас four")


def test_same_clock_minute_on_another_day_is_not_blanked():
    lines = body_rows([incoming("a", when=at(10, 0)), incoming("b", when=at(10, 0, day=25))])
    assert lines[0].startswith("10:00") and lines[1].startswith("10:00")


def test_minute_shown_again_after_an_interruption():
    lines = body_rows(
        [
            incoming("a", when=at(10, 0)),
            incoming("b", when=at(10, 1)),
            incoming("c", when=at(10, 0, 30)),  # late and out of order: shown, not blanked
        ]
    )
    assert [row[:5] for row in lines] == ["10:00", "10:01", "10:00"]


# --- own and incoming messages --------------------------------------------------------


@pytest.mark.parametrize(
    "mark,symbol", [("pending", "○"), ("sent", "✓"), ("delivered", "✓✓"), ("failed", "✗")]
)
def test_own_message_ends_in_its_delivery_mark(mark, symbol):
    (row,) = body_rows([own("привіт", mark=mark)])
    assert row.endswith(f"привіт {symbol}")
    assert row.startswith("10:00 Олена")


def test_failed_mark_is_red_and_delivered_is_not():
    assert any(
        s.color is not None and s.color.name == "red" for s in styles_of("✗", own("x", "failed"))
    )
    assert not any(s.color and s.color.name == "red" for s in styles_of("✓", own("x", "delivered")))


def test_incoming_message_has_no_mark():
    (row,) = body_rows([incoming("привіт")])
    assert row == "10:00 Тарас привіт"
    assert not set("✓✗○…") & set(row)


def test_own_name_is_not_drawn_like_a_peer_name():
    own_styles = styles_of("Олена", own("a"))
    peer_styles = styles_of("Олена", incoming("a", sender="Олена"))
    assert own_styles and peer_styles
    assert own_styles[0].bold and own_styles[0].color is None
    assert peer_styles[0].color is not None


def test_own_message_to_another_conversation_says_to_whom():
    (row,) = body_rows([own("ти де?", peer="Mei", elsewhere=True)])
    assert row.startswith("10:00 Олена → Mei ти де? ✓")


def test_incoming_message_from_another_conversation_is_marked():
    here, there = body_rows(
        [incoming("a"), incoming("b", sender="Mei", when=at(10, 1), elsewhere=True)]
    )
    assert "↪" not in here
    assert there.startswith("10:01 ↪ Mei b")


def test_delayed_message_says_so():
    (row,) = body_rows([incoming("запізнився", delayed=True)])
    assert row == "10:00 Тарас запізнився (delayed)"
    (row,) = body_rows([incoming("вчасно")])
    assert "(delayed)" not in row


def test_mention_of_me_is_highlighted():
    styles = styles_of("@олена", incoming("привіт, @олена!"))
    assert any(s.bold and s.underline for s in styles)


def test_mention_follows_a_name_set_after_construction():
    renderer = TranscriptRenderer("", tz=PLUS2)
    renderer.me = "Mei"
    con = Console(file=io.StringIO(), width=60, color_system="truecolor", force_terminal=True)
    (_rule, row) = renderer.render(incoming("hi mei"))
    styles = [seg.style for seg in con.render(row) if "mei" in seg.text and seg.style]
    assert any(s.bold and s.underline for s in styles)


# --- wrapping -------------------------------------------------------------------------


@pytest.mark.parametrize("width", [30, 40, 60, 80])
def test_long_ukrainian_text_wraps_under_itself(width):
    lines = body_rows([incoming(UKRAINIAN)], width=width)
    indent = len("10:00 Тарас ")
    assert len(lines) > 1
    assert lines[0].startswith("10:00 Тарас ")
    for row in lines:
        assert cell_len(row) <= width
    for row in lines[1:]:
        assert row[:indent].strip() == "", "text leaked into the time or name column"
        assert row[indent] != " "
    words = " ".join(row[indent:] for row in lines).split()
    assert words == UKRAINIAN.split()


def test_wide_cjk_characters_wrap_within_the_width():
    text = "你" * 40
    lines = body_rows([incoming(text, sender="Mei")], width=40)
    indent = len("10:00 Mei ")
    assert len(lines) > 1
    for row in lines:
        assert cell_len(row) <= 40
    for row in lines[1:]:
        assert row[:indent] == " " * indent
    assert "".join(row[indent:] for row in lines) == text


def test_emoji_survive():
    text = "🥭 манго 🎉 👍🏽 ok"
    (row,) = body_rows([own(text, mark="delivered")])
    assert text in row


def test_long_name_is_cut_so_the_text_keeps_room():
    name = "Константинопольський_Костянтин_"  # 31 characters, a valid name
    lines = body_rows([incoming("текст повідомлення", sender=name)], width=40)
    assert "…" in lines[0]
    assert "текст" in lines[0]
    assert all(cell_len(row) <= 40 for row in lines)


def test_multiline_text_continues_under_itself():
    lines = body_rows([incoming("рядок один\r\nрядок два\nрядок три")])
    assert lines == ["10:00 Тарас рядок один", "            рядок два", "            рядок три"]


# --- hostile text ---------------------------------------------------------------------


def test_control_characters_are_shown_not_obeyed():
    text = "\x1b[2J\x1b]0;pwned\x07bell\x08\x9b31m"
    (row,) = body_rows([incoming(text)])
    assert not any(unicodedata.category(ch) == "Cc" for ch in row)
    assert "␛[2J␛]0;pwned␇bell␈" in row


def test_markup_and_emoji_codes_are_shown_literally():
    (row,) = body_rows([incoming("[bold red]boo[/] :smile:")])
    assert row == "10:00 Тарас [bold red]boo[/] :smile:"


def test_safe_text_keeps_newlines_and_tabs_only():
    assert safe_text("a\tb\nc\rd\u2028e\x00") == "a\tb\nc\nd\ne␀"


def test_control_characters_in_names_stay_on_one_row():
    (row,) = body_rows([incoming("hi", sender="evil\nname\x1b")])
    assert "evil␊name␛" in row


def test_absurd_timestamp_does_not_crash():
    (row,) = rows([incoming("з далекого майбутнього", when=10**20)])
    assert row.startswith("--:-- Тарас")


# --- system lines ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,marker,text",
    [
        ("info", "·", "connected as Олена"),
        ("joined", "→", "Тарас joined"),
        ("left", "←", "Тарас left"),
        ("error", "!", "Bob is not a user here"),
        ("receipt", "·", "✓✓ Тарас got: “перші тридцять символів…”"),
    ],
)
def test_system_line_of_each_kind_shows_marker_and_text(kind, marker, text):
    (row,) = body_rows([SystemLine(at(10, 0), text, kind=kind)])
    assert row == f"10:00 {marker} {text}"


def test_error_line_is_red_and_join_is_green():
    assert any(
        s.color and s.color.name == "red" for s in styles_of("!", SystemLine(0, "x", "error"))
    )
    joined = styles_of("joined", SystemLine(0, "Тарас joined", "joined"))
    assert any(s.color and s.color.name == "green" for s in joined)


# --- name colours ---------------------------------------------------------------------


def test_name_colour_ignores_case_and_compatibility_forms():
    assert name_style("Олена") == name_style("олена") == name_style("ОЛЕНА")
    assert name_style("Café") == name_style("Cafe\u0301") == name_style("CAFÉ")
    assert name_style("Тарас") == name_style("Тарас")
    assert name_style("Олена") in NAME_PALETTE


def test_name_colour_is_the_same_in_another_process():
    names = ["Олена", "Тарас", "Mei", "bob", "李小龍"]
    here = [name_style(n) for n in names]
    code = (
        "import sys; from mangogram_client.render import name_style; "
        "print(' '.join(name_style(n) for n in sys.argv[1:]))"
    )
    for seed in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        out = subprocess.run(
            [sys.executable, "-c", code, *names],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            encoding="utf-8",
            check=True,
            timeout=60,
        ).stdout.split()
        assert out == here


def test_different_names_usually_get_different_colours():
    names = ["Олена", "Тарас", "Mei", "bob", "alice", "李小龍", "Zoë", "taras_2"]
    assert len({name_style(n) for n in names}) >= 3


@pytest.mark.parametrize("colour", NAME_PALETTE)
def test_palette_colours_are_valid_and_never_look_like_a_status(colour):
    Style.parse(f"bold {colour}")
    basic = Color.parse(colour).downgrade(ColorSystem.STANDARD)
    assert basic.number not in (0, 1, 2, 7, 9, 15)  # black, red, green, white, bright red/white


# --- any text at all ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=300),
    sender=st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=32),
    width=st.integers(min_value=20, max_value=120),
    is_own=st.booleans(),
    elsewhere=st.booleans(),
    delayed=st.booleans(),
)
def test_any_text_renders_within_the_width(text, sender, width, is_own, elsewhere, delayed):
    line = ChatLine(
        at(10, 0),
        sender,
        "Mei",
        text,
        own=is_own,
        mark="delivered" if is_own else None,
        elsewhere=elsewhere,
        delayed=delayed,
    )
    out = render_plain([line, SystemLine(at(10, 1), text, kind="error")], ME, width=width, tz=PLUS2)
    for row in out.splitlines():
        assert cell_len(row) <= width, row
        assert "\x1b" not in row


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(
        alphabet=st.characters(categories=("L", "N", "P", "S")),
        min_size=1,
        max_size=200,
    ),
    width=st.integers(min_value=20, max_value=100),
)
def test_printable_text_is_never_lost(text, width):
    lines = body_rows([incoming(text)], width=width)
    indent = len("10:00 Тарас ")
    assert "".join(row[indent:] for row in lines) == text


@pytest.mark.parametrize("text", ["👍🏽", "a 👍🏽", "👋🏿 привіт", "❤️", "ok ☺️", "🌻", "你好"])
def test_rich_and_prompt_toolkit_count_emoji_cells_alike(text):
    from prompt_toolkit.utils import get_cwidth
    from rich.cells import cell_len

    shown = safe_text(text)
    assert cell_len(shown) == sum(get_cwidth(c) for c in shown)


def drawn_cells(row: str) -> int:
    """Cells a terminal that draws code point by code point (tmux 3.3, xterm) uses."""
    from prompt_toolkit.utils import get_cwidth

    return sum(get_cwidth(c) for c in row)


@pytest.mark.parametrize("width", [30, 40, 100])
@pytest.mark.parametrize("text", ["a 👍🏽", "👋🏿 привіт " * 6, "❤️ ok"])
def test_emoji_rows_are_never_wider_than_the_terminal(text, width):
    # Rows are padded to the full width: one counted narrower than drawn spills a blank row.
    out = console(width)
    for renderable in TranscriptRenderer(ME, tz=PLUS2).render(incoming(text)):
        out.print(renderable)
    for row in out.file.getvalue().splitlines():  # type: ignore[attr-defined]
        assert drawn_cells(row) <= width, row


def test_input_line_shows_emoji_sequences_as_prompt_toolkit_counts_them():
    from prompt_toolkit.formatted_text.utils import fragment_list_to_text, fragment_list_width
    from prompt_toolkit.layout.processors import TransformationInput

    from mangogram_client.widths import InputAsDrawn

    text = "a👨‍👩‍👧🇺🇦b"
    source = [("", text)]
    shown = InputAsDrawn().apply_transformation(
        TransformationInput(None, None, 0, lambda i: i, source, 80, 1)  # type: ignore[arg-type]
    )
    assert fragment_list_to_text(shown.fragments) == "a👨👩👧UAb"
    # 1 + three 2-cell faces + 2 letters + 1: what a terminal draws for these code points.
    assert fragment_list_width(shown.fragments) == 10
    # The cursor maps both ways: after "b" in the text is after "b" on screen.
    assert shown.source_to_display(len(text)) == len("a👨👩👧UAb")
    assert shown.display_to_source(len("a👨👩👧UAb")) == len(text)
    assert shown.source_to_display(text.index("🇺")) == 4
