"""What the codec costs per message, and what protocol 3's one frame saves on the socket.

    python -m bench.decode_cost [--rounds 7] [--socket-messages 20000]

In one run, alternating round by round so every variant sees the same machine, keeping
the best round of each (absolute times depend on the machine: compare within a run):

* `decode`: frames to a validated message, for SEND, RECEIPT, DELIVER and a 200-item
  HISTORY_PAGE: the old codec (orjson + hand-written checks into frozen dataclasses,
  three frames; bench/legacy) against the msgspec codec, in one frame (version 3) and in
  three (version 2);
* `repeated_key_check`: the msgspec codec's body decoding against msgspec's decoder
  alone: what the size limit and the repeated-key and UTF-8 checks add;
* `encode`: a message to frames, old (orjson over the dataclass) against new (msgspec
  over the Struct);
* `build`: constructing one DELIVER, frozen dataclass against Struct;
* `socket`: sending a SEND-sized message from a DEALER and receiving it on a ROUTER over
  TCP loopback in this process, as one frame (`MGP03...`) and as three: wall time and
  process CPU time (both threads: Python and libzmq's I/O thread) per message.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import timeit
from collections.abc import Callable
from typing import Any

import zmq

from bench.legacy import codec as old_codec
from bench.legacy import messages as old
from mangogram_proto import codec
from mangogram_proto import messages as new

ID = "0123456789abcdef0123456789abcdef"
NOW = 1767268801200
TEXT = "Привіт! Як справи? 🥭"


def page(module: Any) -> Any:
    return module.HistoryPage(
        "bob",
        tuple(
            module.HistoryItem(
                str(i), f"id-{i}", "alice", "bob", f"see you at 10:{i % 60:02d}", 1, 2, 3
            )
            for i in range(200)
        ),
        True,
    )


def samples(module: Any) -> dict[str, tuple[Any, int]]:
    """Messages of `module` (old or new), and how many make one round."""
    return {
        "SEND": (module.Send(ID, "Олена", TEXT, NOW), 10_000),
        "SEND, ':' in the text": (
            module.Send(ID, "bob", "see https://example.org at 12:30", NOW),
            10_000,
        ),
        "RECEIPT": (module.Receipt(1234), 10_000),
        "DELIVER": (module.Deliver(ID, "12345", "Олена", TEXT, NOW, NOW + 10, 7), 10_000),
        "ACCEPTED": (module.Accepted((ID,), ("12345",), NOW), 10_000),
        "HISTORY_PAGE, 200 items": (page(module), 50),
    }


def per_call_us(run: Callable[[], Any], number: int) -> float:
    return timeit.timeit(run, number=number) / number * 1e6


def alternate(variants: dict[str, Callable[[], Any]], number: int, rounds: int) -> dict[str, float]:
    """Best µs per call of each variant, the variants taking turns round by round."""
    best = {label: float("inf") for label in variants}
    for _ in range(rounds):
        for label, run in variants.items():
            best[label] = min(best[label], per_call_us(run, number))
    return {label: round(us, 3) for label, us in best.items()}


def decode_costs(rounds: int) -> dict[str, dict[str, float]]:
    results = {}
    olds, news = samples(old), samples(new)
    for name, (message, number) in news.items():
        legacy_frames = old_codec.encode(olds[name][0])
        v3 = codec.encode(message, 3)
        v2 = codec.encode(message, 2)
        assert codec.decode(v3) == message == codec.decode(v2)
        times = alternate(
            {
                "old_us": lambda f=legacy_frames: old_codec.decode(f),
                "new_v3_us": lambda f=v3: codec.decode(f),
                "new_v2_us": lambda f=v2: codec.decode(f),
            },
            number,
            rounds,
        )
        times["old_over_new_v3"] = round(times["old_us"] / times["new_v3_us"], 2)
        results[name] = times
    return results


def repeated_key_check_costs(rounds: int) -> dict[str, dict[str, float]]:
    """`codec.decode_body` (size limit, msgspec, the repeated-key and UTF-8 proof or the
    exact check) against msgspec's decoder alone on the same body."""
    results = {}
    for name, (message, number) in samples(new).items():
        command, body = codec.encode_parts(message)
        msgspec_alone = codec._PLANS[command].decoder
        times = alternate(
            {
                "decode_body_us": lambda c=command, b=body: codec.decode_body(c, b, 32768),
                "msgspec_alone_us": lambda d=msgspec_alone, b=body: d(b),
            },
            number,
            rounds,
        )
        times["checks_us"] = round(times["decode_body_us"] - times["msgspec_alone_us"], 3)
        results[name] = times
    return results


def encode_costs(rounds: int) -> dict[str, dict[str, float]]:
    results = {}
    olds, news = samples(old), samples(new)
    for name, (message, number) in news.items():
        legacy = olds[name][0]
        assert old_codec.encode(legacy) == codec.encode(message, 2), name
        times = alternate(
            {
                "old_us": lambda m=legacy: old_codec.encode(m),
                "new_v3_us": lambda m=message: codec.encode(m, 3),
                "new_v2_us": lambda m=message: codec.encode(m, 2),
            },
            number,
            rounds,
        )
        times["old_over_new_v3"] = round(times["old_us"] / times["new_v3_us"], 2)
        results[name] = times
    return results


def build_costs(rounds: int) -> dict[str, float]:
    times = alternate(
        {
            "dataclass_us": lambda: old.Deliver(ID, "12345", "Олена", TEXT, NOW, NOW + 10, 7),
            "struct_us": lambda: new.Deliver(ID, "12345", "Олена", TEXT, NOW, NOW + 10, 7),
        },
        100_000,
        rounds,
    )
    times["dataclass_over_struct"] = round(times["dataclass_us"] / times["struct_us"], 2)
    return times


def socket_costs(rounds: int, messages: int) -> dict[str, dict[str, float]]:
    """Per message: a DEALER sends `messages` SENDs in one framing, a ROUTER receives them."""
    send = new.Send(ID, "Олена", TEXT, NOW)
    framings = {"one_frame": codec.encode(send, 3), "three_frames": codec.encode(send, 2)}
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    try:
        for sock in (router, dealer):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        router.bind("tcp://127.0.0.1:*")
        dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
        dealer.send_multipart(framings["one_frame"])  # connected before timing starts
        assert router.poll(5000), "the loopback connection did not come up"
        router.recv_multipart()
        best: dict[str, dict[str, float]] = {
            label: {"wall_us": float("inf"), "cpu_us": float("inf")} for label in framings
        }
        for _ in range(rounds):
            for label, frames in framings.items():
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(messages):
                    dealer.send_multipart(frames)
                for _ in range(messages):
                    if not router.poll(5000):
                        raise RuntimeError("a message went missing on loopback")
                    received = router.recv_multipart()
                wall = (time.perf_counter() - wall) / messages * 1e6
                cpu = (time.process_time() - cpu) / messages * 1e6
                assert received[1:] == frames
                best[label]["wall_us"] = min(best[label]["wall_us"], wall)
                best[label]["cpu_us"] = min(best[label]["cpu_us"], cpu)
    finally:
        dealer.close(0)
        router.close(0)
        context.term()
    return {label: {k: round(v, 3) for k, v in times.items()} for label, times in best.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--socket-messages", type=int, default=20_000)
    args = parser.parse_args(argv)
    results = {
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "decode": decode_costs(args.rounds),
        "repeated_key_check": repeated_key_check_costs(args.rounds),
        "encode": encode_costs(args.rounds),
        "build": build_costs(args.rounds),
        "socket": socket_costs(args.rounds, args.socket_messages),
    }
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
