"""Echo bot: answers every private message with the same text.

python examples/echo_bot.py --name echo --endpoint tcp://127.0.0.1:5555
"""

from __future__ import annotations

import argparse
import logging

from mangogram_proto import Bot, IncomingMessage


def main() -> None:
    parser = argparse.ArgumentParser(description="A MangoGram bot that echoes messages back.")
    parser.add_argument("--name", default="echo", help="the bot's user name")
    parser.add_argument(
        "--endpoint",
        default="tcp://127.0.0.1:5555",
        help="broker endpoint; for a cluster, several separated by commas (fails over)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    bot = Bot(args.name, args.endpoint)

    @bot.on_message
    async def echo(message: IncomingMessage) -> str:
        return f"echo: {message.text}"

    bot.run()


if __name__ == "__main__":
    main()
