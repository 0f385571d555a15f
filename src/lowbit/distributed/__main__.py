"""``python -m lowbit.distributed ...`` = ``lowbit dist-train ...`` (what torchrun starts)."""
import sys

from lowbit.cli import main

sys.exit(main(["dist-train", *sys.argv[1:]]))
