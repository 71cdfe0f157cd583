"""The console client's pure parts: what typed lines mean, and how events become lines
and toolbar state."""

from __future__ import annotations

import pytest

from mangogram_client.commands import (
    COMMANDS,
    Exit,
    Hint,
    ListUsers,
    Nothing,
    SendText,
    ShowHelp,
    SwitchPeer,
    help_lines,
    parse_input,
)
from mangogram_client.lines import ChatLine, SystemLine
from mangogram_client.render import render_plain
from mangogram_client.settings import normalise_address
from mangogram_client.state import (
    DELIVERY_GRACE_MS,
    RECEIPT_BATCH_MS,
    UNACCEPTED_GRACE_MS,
    ChatState,
)
from mangogram_proto.events import (
    BrokerError,
    ConnectionLost,
    IncomingMessage,
    LoggedIn,
    MessageAccepted,
    MessageDelivered,
    MessageFailed,
    NameStatus,
    OnlineUsers,
    PresenceChanged,
)

from .harness import TEST_LIMITS

T = 1_795_500_000_000


@pytest.mark.parametrize(
    "typed,command",
    [
        ("hello", SendText("hello")),
        ("  spaced  ", SendText("  spaced  ")),
        ("", Nothing()),
        ("   ", Nothing()),
        ("/to Тарас", SwitchPeer("Тарас")),
        ("/TO @Тарас", SwitchPeer("Тарас")),
        ("/query bob", SwitchPeer("bob")),
        ("/to", Hint("usage: /to NAME")),
        ("/to two words", Hint("usage: /to NAME")),
        ("/users", ListUsers()),
        ("/who", ListUsers()),
        ("/help", ShowHelp()),
        ("/exit", Exit()),
        ("/quit", Exit()),
        ("@mei привіт всім", SendText("привіт всім", to="mei")),
        ("//not a command", SendText("/not a command")),
    ],
)
def test_typed_lines_mean_what_a_chat_user_expects(typed, command):
    assert parse_input(typed) == command


@pytest.mark.parametrize("typed", ["/dance", "@", "@bob", "@bob   ", "/exit now"])
def test_mistakes_get_a_one_line_hint(typed):
    hint = parse_input(typed)
    assert isinstance(hint, Hint)
    assert "\n" not in hint.text and hint.text


def logged_in(state: ChatState, online=("Тарас", "Mei")) -> None:
    state.on_event(LoggedIn("Олена", T, TEST_LIMITS, online, resumed=False), T)


def incoming(sender: str, text: str, at: int = T) -> IncomingMessage:
    return IncomingMessage("id-" + text, "b-" + text, sender, text, at, at)


def test_login_shows_who_is_online():
    state = ChatState("Олена")
    lines = state.on_event(LoggedIn("Олена", T, TEST_LIMITS, ("Тарас", "Mei"), False), T)
    assert [line.text for line in lines] == ["logged in as Олена", "online (2): Mei, Тарас"]
    assert state.connection == "online"


def test_own_message_prints_once_with_double_tick_when_delivered_quickly():
    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("тарас", T)
    assert state.peer == "Тарас"
    state.sent("m1", "Тарас", "Привіт", T)
    assert state.due(T + 10) == []
    assert state.on_event(MessageAccepted("m1", "b1", T + 1), T + 1) == []
    (line,) = state.on_event(MessageDelivered("m1", "b1", "Тарас", T + 2), T + 2)
    assert isinstance(line, ChatLine) and line.own and line.mark == "delivered"
    assert state.due(T + 10**6) == []


def test_a_reply_before_our_double_tick_waits_for_our_line_and_is_confirmed_after():
    """A bot answers before it confirms: the reply comes before our ✓✓. It is held (not
    handed out, so not confirmed) until our line is printed, and then printed below it."""
    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("Тарас", T)
    state.sent("m1", "Тарас", "order test 1", T)
    state.on_event(MessageAccepted("m1", "b1", T + 1), T + 1)
    reply = incoming("Тарас", "echo: order test 1", T + 2)
    assert state.on_event(reply, T + 2) == []
    assert state.on_event(incoming("Тарас", "and more", T + 3), T + 3) == []  # keeps its place
    assert state.take_shown() == [] and state.take_reads() == []
    lines = state.on_event(MessageDelivered("m1", "b1", "Тарас", T + 4), T + 4)
    assert [(line.text, line.own) for line in lines if isinstance(line, ChatLine)] == [
        ("order test 1", True),
        ("echo: order test 1", False),
        ("and more", False),
    ]
    assert lines[0].mark == "delivered"  # one line with ✓✓, no receipt line later
    assert [m.text for m in state.take_shown()] == ["echo: order test 1", "and more"]
    assert state.take_reads() == ["b-echo: order test 1", "b-and more"]
    assert state.due(T + 10**6) == []


def test_a_reply_waits_no_longer_than_our_lines_grace():
    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("Тарас", T)
    state.sent("m1", "Тарас", "hello", T)
    state.on_event(MessageAccepted("m1", "b1", T + 1), T + 1)
    assert state.on_event(incoming("Тарас", "hi", T + 2), T + 2) == []
    assert state.on_event(incoming("Mei", "unrelated", T + 3), T + 3) == []  # in arrival order
    lines = state.due(T + 1 + DELIVERY_GRACE_MS)
    assert [line.text for line in lines] == ["hello", "hi", "unrelated"]
    assert lines[0].mark == "sent"
    assert len(state.take_shown()) == 2


def test_a_message_from_someone_else_is_not_held():
    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("Тарас", T)
    state.sent("m1", "Тарас", "hello", T)
    state.on_event(MessageAccepted("m1", "b1", T + 1), T + 1)
    (line,) = state.on_event(incoming("Mei", "hi", T + 2), T + 2)
    assert line.text == "hi" and [m.text for m in state.take_shown()] == ["hi"]


def test_messages_crossing_are_not_held():
    """Both write at once: Тарас's message reached the broker before ours, so it cannot
    answer ours and is shown (and confirmed) at once. Held, each side would wait for
    the other's ✓✓, which needs the other to show, and both would print with ✓."""
    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("Тарас", T)
    state.sent("m1", "Тарас", "hello", T)
    crossing = incoming("Тарас", "hi", T + 1)
    state.on_event(MessageAccepted("m1", "b1", T + 2), T + 2)
    (line,) = state.on_event(crossing, T + 3)
    assert line.text == "hi" and state.take_shown() == [crossing]
    (own,) = state.on_event(MessageDelivered("m1", "b1", "Тарас", T + 4), T + 4)
    assert own.mark == "delivered"


def test_own_message_prints_with_single_tick_then_gets_a_receipt_line():
    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("Тарас", T)
    state.sent("m1", "Тарас", "Довге повідомлення про щось важливе і цікаве", T)
    state.on_event(MessageAccepted("m1", "b1", T + 1), T + 1)
    (line,) = state.due(T + 1 + DELIVERY_GRACE_MS)
    assert line.mark == "sent"
    assert state.on_event(MessageDelivered("m1", "b1", "Тарас", T + 5000), T + 5000) == []
    (receipt,) = state.due(T + 5000 + RECEIPT_BATCH_MS)
    assert receipt.kind == "receipt" and "✓✓ Тарас" in receipt.text and "…" in receipt.text


def test_a_burst_of_late_receipts_is_one_line_per_person():
    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("Тарас", T)
    for i in range(12):
        state.sent(f"m{i}", "Тарас", f"повідомлення {i}", T)
    state.sent("x", "Mei", "hi Mei", T)
    printed = state.due(T + UNACCEPTED_GRACE_MS)  # the broker is away: printed with ○
    assert len(printed) == 13
    later = T + 60_000  # back after a reconnect: every receipt at once
    lines = []
    for i in range(12):
        lines += state.on_event(MessageDelivered(f"m{i}", f"b{i}", "Тарас", later), later)
    lines += state.on_event(MessageDelivered("x", "bx", "Mei", later), later)
    assert lines == []
    assert state.next_due() == later + RECEIPT_BATCH_MS
    texts = [line.text for line in state.due(later + RECEIPT_BATCH_MS)]
    assert texts == [
        "✓✓ Тарас got 12 messages, “повідомлення 0” to “повідомлення 11”",
        "✓✓ Mei got “hi Mei”",
    ]


def test_unaccepted_message_shows_pending_after_grace():
    state = ChatState("Олена")
    logged_in(state)
    state.sent("m1", "Тарас", "hello", T)
    (line,) = state.due(T + UNACCEPTED_GRACE_MS)
    assert line.mark == "pending" and line.elsewhere  # no conversation open


def test_failed_message_is_marked_and_explained():
    state = ChatState("Олена")
    logged_in(state)
    state.sent("m1", "nobody", "hello", T)
    line, reason = state.on_event(
        MessageFailed("m1", "nobody", "unknown_recipient", "nobody is called nobody"), T
    )
    assert line.mark == "failed"
    assert reason.kind == "error" and "nobody is called nobody" in reason.text


def test_message_from_someone_else_is_marked_and_counted_unread():
    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("Тарас", T)
    (line,) = state.on_event(incoming("Mei", "你好"), T)
    assert line.elsewhere
    assert state.unread["mei"] == 1
    toolbar = "".join(text for _, text in state.toolbar())
    assert "unread: Mei (1)" in toolbar
    (switched,) = state.switch_peer("mei", T)
    assert "1 unread" in switched.text
    assert not state.unread


def test_first_incoming_message_opens_its_conversation():
    state = ChatState("Олена")
    logged_in(state)
    hint, line = state.on_event(incoming("Тарас", "Привіт"), T)
    assert state.peer == "Тарас" and not line.elsewhere
    assert "talking to Тарас" in hint.text


def test_toolbar_shows_connection_peer_and_online_count():
    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("Тарас", T)
    text = "".join(t for _, t in state.toolbar())
    assert "online" in text and "Олена → Тарас" in text and "2 online" in text
    state.on_event(ConnectionLost("no reply"), T)
    assert "reconnecting" in "".join(t for _, t in state.toolbar())


def test_presence_updates_online_and_prints_joins_and_leaves():
    state = ChatState("Олена")
    logged_in(state)
    (joined,) = state.on_event(PresenceChanged("Богдан", True, T), T)
    assert joined.kind == "joined" and "Богдан" in joined.text
    (left,) = state.on_event(PresenceChanged("Богдан", False, T), T)
    assert left.kind == "left"
    assert "богдан" not in state.online


def test_tab_completion_offers_online_users_and_senders_not_typos():
    state = ChatState("Олена")
    logged_in(state)
    state.sent("m1", "тарсс", "typo", T)
    state.on_event(incoming("Zoë", "hi"), T)
    assert state.completions() == ["Mei", "Zoë", "Тарас"]
    state.on_event(OnlineUsers(("Олена",)), T)
    assert state.completions() == ["Zoë"]


def test_tab_completion_offers_offline_people_we_talked_with():
    state = ChatState("Олена")
    logged_in(state)
    state.sent("m1", "Богдан", "привіт", T)  # offline, but the broker took it: he exists
    state.on_event(MessageAccepted("m1", "b1", T + 1), T + 1)
    state.sent("m2", "тарсс", "typo", T)  # refused: never offered
    state.on_event(MessageFailed("m2", "тарсс", "unknown_recipient", "nobody is called тарсс"), T)
    state.on_event(OnlineUsers(("Олена",)), T)
    assert state.completions() == ["Богдан"]
    # A new run starts with the contacts the app saved.
    again = ChatState("Олена")
    again.contacts.update(state.contacts)
    assert again.completions() == ["Богдан"]


def test_a_conversation_renders_with_times_names_and_marks():
    state = ChatState("Олена")
    lines = state.on_event(LoggedIn("Олена", T, TEST_LIMITS, ("Тарас",), False), T)
    lines += state.switch_peer("Тарас", T)
    lines += state.on_event(incoming("Тарас", "Привіт! Як ти? 🌻", T + 60_000), T + 60_000)
    state.sent("m1", "Тарас", "Добре, дякую 😊", T + 120_000)
    state.on_event(MessageAccepted("m1", "b1", T + 120_001), T + 120_001)
    lines += state.on_event(MessageDelivered("m1", "b1", "Тарас", T + 120_002), T + 120_002)
    text = render_plain(lines, me="Олена", width=70)
    assert "Привіт! Як ти? 🌻" in text
    assert "Добре, дякую 😊" in text
    assert "✓✓" in text
    assert text.count(":") >= 3  # HH:MM on each new minute


def test_system_lines_render_for_every_kind():
    kinds = ["info", "joined", "left", "error", "receipt"]
    lines = [SystemLine(T, f"text {k}", k) for k in kinds]
    text = render_plain(lines, me="Олена", width=60)
    for k in kinds:
        assert f"text {k}" in text


def test_history_command_parses_its_count():
    from mangogram_client.commands import ShowHistory

    assert parse_input("/history") == ShowHistory(20)
    assert parse_input("/history 5") == ShowHistory(5)
    assert isinstance(parse_input("/history lots"), Hint)
    assert isinstance(parse_input("/history 0"), Hint)


def test_messages_seen_in_the_open_conversation_are_reported_read():
    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("Тарас", T)
    state.on_event(incoming("Тарас", "бачиш?"), T)
    state.on_event(incoming("Mei", "and me?"), T)
    assert state.take_reads() == ["b-бачиш?"]
    assert state.take_reads() == []
    state.switch_peer("Mei", T)  # opening Mei's conversation shows her message
    assert state.take_reads() == ["b-and me?"]


def test_read_receipt_shows_in_the_toolbar():
    from mangogram_proto.events import MessageRead

    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("Тарас", T)
    state.on_event(MessageRead("m1", "b1", "Тарас", T), T)
    assert "(seen " in "".join(t for _, t in state.toolbar())


def test_history_page_renders_oldest_first_with_own_marks():
    from mangogram_proto.events import HistoryReceived
    from mangogram_proto.messages import HistoryItem

    state = ChatState("Олена")
    logged_in(state)
    items = (
        HistoryItem("3", "c", "Тарас", "Олена", "третє", T + 3, T + 3),
        HistoryItem("2", "b", "Олена", "Тарас", "друге", T + 2, T + 2, delivered_at=T + 2),
        HistoryItem("1", "a", "Олена", "Тарас", "перше", T + 1, T + 1),
    )
    header, *chat, more = state.on_event(HistoryReceived("Тарас", items, True), T + 10)
    assert "history with Тарас" in header.text
    assert [c.text for c in chat] == ["перше", "друге", "третє"]
    assert [c.mark for c in chat] == ["sent", "delivered", None]
    assert "older messages" in more.text


def test_delayed_message_is_marked():
    state = ChatState("Олена")
    logged_in(state)
    message = IncomingMessage("i", "b", "Тарас", "пізно", T, T, seq=1, delayed=True)
    (_hint, line) = state.on_event(message, T + 1)
    assert line.delayed


def test_open_conversation_takes_the_registered_spelling_when_they_join():
    state = ChatState("Олена")
    logged_in(state, online=())
    state.switch_peer("тарас", T)
    assert state.peer == "тарас"
    state.on_event(PresenceChanged("Тарас", True, T), T)
    assert state.peer == "Тарас"


def test_a_server_key_starting_with_a_dash_is_not_taken_for_an_option():
    from mangogram_client.cli import build_parser, glue_key_values

    key = "-" + "a" * 39
    args = build_parser().parse_args(glue_key_values(["--server-key", key, "--name", "x"]))
    assert args.server_key == key and args.name == "x"


@pytest.mark.parametrize(
    ("typed", "endpoint"),
    [
        ("localhost", "tcp://localhost:5555"),
        ("localhost:47310", "tcp://localhost:47310"),
        ("tcp://localhost:47310", "tcp://localhost:47310"),
        ("tcp://chat.example.org", "tcp://chat.example.org:5555"),
        (" 10.0.0.7:6000 ", "tcp://10.0.0.7:6000"),
        ("[::1]:6000", "tcp://[::1]:6000"),
        ("::1", "tcp://[::1]:5555"),
        ("ipc:///tmp/mangogram", "ipc:///tmp/mangogram"),
    ],
)
def test_an_address_is_accepted_with_or_without_scheme_and_port(typed, endpoint):
    assert normalise_address(typed) == endpoint


@pytest.mark.parametrize("typed", ["", "host:port", "host:70000", "http://host", "a b", "tcp://:5"])
def test_a_broken_address_is_explained(typed):
    with pytest.raises(ValueError, match="address|port|tcp://"):
        normalise_address(typed)


@pytest.mark.parametrize("width", [200, 80, 60, 40, 30, 20, 14])
def test_toolbar_fits_the_width_and_keeps_state_and_unread(width):
    from prompt_toolkit.formatted_text.utils import fragment_list_width

    state = ChatState("Олена")
    state.on_event(LoggedIn("Олена", 0, TEST_LIMITS, ("Тарас", "Mei", "Bohdan"), False), 0)
    state.switch_peer("Тарас", 0)
    for sender in ("Mei", "Mei", "Bohdan"):
        state.on_event(IncomingMessage("i", "b", sender, "hi", 0, 0), 0)
    parts = state.toolbar(width)
    text = "".join(t for _, t in parts)
    assert fragment_list_width(parts) <= width, text
    assert text.startswith(" online "), text
    assert "3" in text and ("unread" in text or "✉" in text), text
    if width >= 80:
        assert "unread: Bohdan (1), Mei (2)" in text and "Олена → Тарас" in text


def test_an_outage_is_said_once_and_its_end_too():
    state = ChatState("Олена")
    state.on_event(LoggedIn("Олена", 0, TEST_LIMITS, (), False), 0)
    lost = [state.on_event(ConnectionLost("no reply"), t) for t in (1, 2, 3)]
    assert [len(lines) for lines in lost] == [1, 0, 0]
    assert state.connection == "reconnecting"
    # A restarted broker does not know our resume token: still "reconnected", not a login.
    back = state.on_event(LoggedIn("Олена", 0, TEST_LIMITS, (), False), 4)
    assert [line.text for line in back] == ["reconnected"]
    assert state.connection == "online"


def test_help_is_an_aligned_list_one_command_a_row():
    lines = [SystemLine(T, text) for text in help_lines()]
    rows = [r for r in render_plain(lines, "Олена", width=100).splitlines() if "·" in r]
    assert len(rows) == len(help_lines()) >= 8
    starts = {row.index(what) for row, (_, what) in zip(rows, COMMANDS, strict=True)}
    assert len(starts) == 1, rows  # every description begins in the same column
    for command in ("/to NAME", "@NAME text", "/history [N]", "/users", "/help", "/exit"):
        assert sum(command in row for row in rows) == 1


def test_text_over_the_announced_limits_is_caught_before_sending():
    state = ChatState("Олена")
    assert state.text_problem("x" * 10**6) is None  # no limits known before login
    state.on_event(LoggedIn("Олена", 0, TEST_LIMITS, (), False), 0)
    limit = TEST_LIMITS.max_text_chars
    assert state.text_problem("x" * limit) is None
    assert "characters" in (state.text_problem("x" * (limit + 1)) or "")
    assert state.length_counter("x" * (limit // 2)) is None
    near = state.length_counter("x" * limit)
    assert near is not None and near[1].strip() == f"{limit}/{limit}"
    text = "".join(t for _, t in state.toolbar(40, "x" * (limit + 5)))
    assert f"{limit + 5}/{limit}" in text


def test_unread_counts_and_contacts_carry_over_from_the_last_run():
    from mangogram_client.settings import ChatMemory

    state = ChatState("Олена")
    state.remember(ChatMemory({"mei": "Mei"}, {"mei": 2}))
    logged_in(state)
    assert "unread: Mei (2)" in "".join(t for _, t in state.toolbar())
    assert "Mei" in state.completions()
    state.switch_peer("mei", T)
    assert not state.unread


def test_messages_shown_pending_then_taken_by_the_broker_say_so_once():
    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("Тарас", T)
    for i in range(3):
        state.sent(f"m{i}", "Тарас", f"лист {i}", T)
    assert [line.mark for line in state.due(T + UNACCEPTED_GRACE_MS)] == ["pending"] * 3
    later = T + 30_000  # the broker is back; Тарас is offline: accepted, not delivered
    for i in range(3):
        assert state.on_event(MessageAccepted(f"m{i}", f"b{i}", later), later) == []
    (line,) = state.due(later + RECEIPT_BATCH_MS)
    assert line.text == "✓ the broker has 3 messages for Тарас, “лист 0” to “лист 2”"


def test_a_note_to_myself_is_shown_once():
    state = ChatState("Олена")
    logged_in(state)
    state.switch_peer("олена", T)
    state.sent("m1", "олена", "купити хліб", T)
    echo = IncomingMessage("m1", "b1", "Олена", "купити хліб", T, T + 1)
    assert state.on_event(echo, T + 1) == []
    (line,) = state.on_event(MessageDelivered("m1", "b1", "Олена", T + 2), T + 2)
    assert line.own and line.text == "купити хліб"
    # From another session of mine (another id) it is news, and shown.
    other = IncomingMessage("z9", "b2", "Олена", "з телефона", T, T + 3)
    assert [x.text for x in state.on_event(other, T + 3)] == ["з телефона"]


def test_to_a_name_nobody_known_has_says_so_at_once():
    state = ChatState("Олена")
    logged_in(state)  # Тарас and Mei are online
    (line,) = state.switch_peer("тарас", T)
    assert line.text == "talking to Тарас (online)"
    talking, warning = state.switch_peer("Nobody", T)
    assert talking.text == "talking to Nobody (offline)"
    assert warning.kind == "error" and "nobody called Nobody is online" in warning.text
    state.contacts["богдан"] = "Богдан"  # talked with before: offline is expected
    assert len(state.switch_peer("богдан", T)) == 1


def test_to_an_unknown_name_asks_the_broker_and_keeps_the_conversation():
    state = ChatState("Олена")
    logged_in(state)  # Тарас and Mei are online
    state.switch_peer("Тарас", T)
    assert state.ask_peer("mei", T, can_ask=True)[0].text == "talking to Mei (online)"
    state.switch_peer("Тарас", T)
    assert state.ask_peer("Nobody", T, can_ask=True) is None
    assert state.peer == "Тарас"  # kept while the broker is asked
    assert state.on_event(NameStatus("Someone", False), T) == []  # not what was asked
    (line,) = state.on_event(NameStatus("nobody", False), T)
    assert line.kind == "error" and line.text == "nobody is called nobody"
    assert state.peer == "Тарас" and state.asking is None
    # A registered name opens with the broker's spelling, and no warning.
    assert state.ask_peer("богдан", T, can_ask=True) is None
    (line,) = state.on_event(NameStatus("Богдан", True), T)
    assert line.text == "talking to Богдан (offline)" and state.peer == "Богдан"


def test_to_opens_at_once_when_the_broker_cannot_answer():
    state = ChatState("Олена")
    logged_in(state)
    assert state.ask_peer("Nobody", T, can_ask=False)[1].kind == "error"  # offline: warned
    assert state.ask_peer("Ghost", T, can_ask=True) is None
    older = BrokerError("unknown_command", "unknown command LOOKUP", None)
    talking, warning = state.on_event(older, T)
    assert talking.text == "talking to Ghost (offline)" and warning.kind == "error"
    assert state.ask_peer("Ghost2", T, can_ask=True) is None
    limited = BrokerError("rate_limited", "too many LOOKUP; at most 2/s", 500)
    said, talking, _warning = state.on_event(limited, T)
    assert "too many LOOKUP" in said.text and state.peer == "Ghost2"
