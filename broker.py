"""Run the MangoGram broker: `python broker.py --help` lists the options."""

import sys

from mangogram_broker.cli import main

if __name__ == "__main__":
    sys.exit(main())
