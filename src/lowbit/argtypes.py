"""Argument parsing shared by the ``lowbit`` command and ``python -m lowbit.distributed``.

Range-checked ``type=`` functions, so a bad number is refused where it is parsed (one argparse
line, exit status 2, before any work), a help formatter that shows every default, a parser whose
errors are one line, and :class:`UsageError` for problems found after parsing (a file that is
not a checkpoint, an unknown recipe) that should read the same way.

This module must stay free of torch and numpy: ``lowbit --help`` imports it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


class UsageError(ValueError):
    """A problem with what the user asked for, found after parsing; the command prints it as
    ``prog: error: message`` and exits with status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``prog: error: message (see prog --help)``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to every option that has a default worth showing (not None, not a
    switch that is off), so each subcommand's --help states what runs when nothing is given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "%(default)" in text or "default:" in text:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)"
        return text


def _number(kind: Callable, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """``type=`` for counts that must be at least 1 (epochs, batch size, stages, rows)."""
    v = _number(int, text, "a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def nonnegative_int(text: str) -> int:
    """``type=`` for counts where 0 means "none" or "off" (warm-up epochs, checkpoint interval)."""
    v = _number(int, text, "an integer >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {v}")
    return v


def positive_float(text: str) -> float:
    """``type=`` for a finite quantity above zero (learning rate, bits, seconds)."""
    v = _number(float, text, "a positive number")
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def int_in(*choices: int) -> Callable[[str], int]:
    """``type=`` for an integer from a fixed set (bit widths), with the set in the message."""

    def check(text: str) -> int:
        v = _number(int, text, f"one of {', '.join(map(str, choices))}")
        if v not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, choices))}, got {v}")
        return v

    check.__name__ = "int"  # argparse names the type in some messages
    return check


def int_list(text: str) -> tuple[int, ...]:
    """``type=`` for comma-separated positive integers (``"2,3,4,8"``)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def comma_choices(*allowed: str) -> Callable[[str], list[str]]:
    """``type=`` for a comma-separated selection from ``allowed`` (``"resnet,vit"``), order kept."""

    def check(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(allowed)} (comma separated), got {text!r}")
        return names

    check.__name__ = "list"
    return check


def existing_file(text: str) -> str:
    """``type=`` for a file that must already exist (a checkpoint to load)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"not a file: {text}")
    return text


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace, func: Callable[[argparse.Namespace], int]) -> int:
    """Run ``func(args)``; a :class:`UsageError` raised before the work starts becomes the
    parser's one-line error (exit status 2)."""
    try:
        return func(args)
    except UsageError as e:
        parser.error(" ".join(str(e).split()))  # one line, whatever the message held
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 1  # not reached: parser.error exits
