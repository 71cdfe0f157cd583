"""What refusing repeated JSON keys costs `codec.decode`, per kind of body.

    python -m bench.decode_cost [--rounds 7]

Each body is decoded with the check and with it switched off, alternating round by
round so both see the same machine; the best round of each is kept and their ratio
printed. Absolute times depend on the machine; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable
from typing import Any

from mangogram_proto import codec
from mangogram_proto.messages import Deliver, HistoryItem, HistoryPage, Send

ID = "0123456789abcdef0123456789abcdef"


def bodies() -> dict[str, tuple[list[bytes], int]]:
    """Frames to decode, and how many decodes make one round."""
    page = HistoryPage(
        "bob",
        tuple(
            HistoryItem(str(i), f"id-{i}", "alice", "bob", f"see you at 10:{i % 60:02d}", 1, 2, 3)
            for i in range(200)
        ),
        True,
    )
    return {
        "SEND, no ':' in strings": (
            codec.encode(Send(ID, "Олена", "Привіт! Як справи? 🥭", 1767268801200)),
            10_000,
        ),
        "SEND, ':' in the text": (
            codec.encode(Send(ID, "bob", "see https://example.org at 12:30", 1767268801200)),
            10_000,
        ),
        "DELIVER": (
            codec.encode(Deliver(ID, "12345", "Олена", "hello", 1767268801200, 1767268801210, 7)),
            10_000,
        ),
        "HISTORY_PAGE, 200 items": (codec.encode(page), 100),
    }


def best_round(decode: Callable[[], Any], number: int) -> float:
    return min(timeit.repeat(decode, number=number, repeat=1)) / number


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    check = codec._repeated_key
    results = {}
    for name, (frames, number) in bodies().items():
        times: dict[str, list[float]] = {"with check": [], "without": []}
        for _ in range(args.rounds):
            for label in times:
                codec._repeated_key = check if label == "with check" else (lambda p, b: None)  # type: ignore[assignment]
                try:
                    times[label].append(best_round(lambda f=frames: codec.decode(f), number))
                finally:
                    codec._repeated_key = check  # type: ignore[assignment]
        with_check, without = min(times["with check"]), min(times["without"])
        results[name] = {
            "without_us": round(without * 1e6, 3),
            "with_check_us": round(with_check * 1e6, 3),
            "ratio": round(with_check / without, 3),
        }
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
