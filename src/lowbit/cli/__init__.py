"""The ``lowbit`` command: train with compressed activations, quantize, explain, pipeline-train,
and run the benchmarks.

One module per subcommand, each with ``register(subparsers)`` (its options, with range checks in
their ``type=`` and every default shown in --help) and a ``run(args) -> int`` set as ``func``.
Nothing is imported from torch or the library until a command runs, so ``lowbit --help`` and
``lowbit <command> --help`` answer at once. Bad input ends in one ``lowbit <command>: error: ...``
line and exit status 2, before any work: argparse for what can be checked alone, and
:class:`lowbit.argtypes.UsageError` for what needs the library (an unknown recipe, a file that is
not a checkpoint).

To add a subcommand: a module with ``register`` and ``run``, listed in :data:`COMMANDS`.
"""
from __future__ import annotations

import sys

from lowbit.argtypes import Parser, run_command
from lowbit.cli import bench, dist_train, explain, ptq, quantize, train

COMMANDS = [train, quantize, ptq, explain, dist_train, bench]


def build_parser() -> Parser:
    p = Parser(prog="lowbit", description="Train and run neural networks with fewer bits and less memory. "
               "`lowbit <command> --help` lists a command's options and their defaults.")
    from lowbit import __version__

    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="command")
    for command in COMMANDS:
        command.register(sub)
    return p


def _parser_of(p: Parser, args) -> Parser:
    """The innermost subcommand's parser, so its errors carry its name (``lowbit train: error``)."""
    for action in p._subparsers._group_actions if p._subparsers else []:
        chosen = action.choices.get(getattr(args, action.dest, None) or "")
        if chosen is not None:
            return _parser_of(chosen, args)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    return run_command(_parser_of(p, args), args, args.func)


if __name__ == "__main__":
    sys.exit(main())
