"""``python -m lowbit.distributed ...``: the same options as ``lowbit dist-train`` (this is what
torchrun starts, one process per rank)."""
import sys

from lowbit.argtypes import HelpFormatter, Parser, run_command
from lowbit.distributed.command import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m lowbit.distributed", formatter_class=HelpFormatter,
               description="Pipeline-parallel CharGPT training with compressed stage traffic (AC-SGD); "
                           "spawns local ranks, or runs as one rank under torchrun.")
    add_arguments(p)
    args = p.parse_args(argv)
    return run_command(p, args, run)


if __name__ == "__main__":
    sys.exit(main())
