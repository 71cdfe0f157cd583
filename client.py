"""Run the MangoGram console client: `python client.py --help` lists the options."""

import sys

from mangogram_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
