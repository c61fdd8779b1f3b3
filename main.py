"""The published entry point: `python main.py [flags]` is `agd train [flags]`."""

import sys

from torch_agd.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
