"""Pieces every subcommand uses. Nothing here imports torch at module level: ``lowbit --help``
must stay fast, so torch and the library come in inside the functions that need them."""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Iterator

from lowbit.argtypes import HelpFormatter, UsageError, positive_int

IMAGE_DATA = ["fashion-mnist", "digits"]


def add_command(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser with every default shown in its --help."""
    return sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's own choice, usually all cores)")


def set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def usage_errors(prefix: str = "") -> Iterator[None]:
    """Inside: a ValueError from checking the configuration (a config class refusing a setting, a
    checkpoint that is not one), a missing data set (FileNotFoundError, whose message says how to
    get it) or a missing optional package (ImportError) is about the user's input or set-up, not a
    bug: report it as a usage error. Wrap only set-up, never training, so real failures keep their
    traceback."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise UsageError(prefix + str(e)) from None


def load_state_dict_arg(path: str, option: str) -> dict:
    """The state_dict given by ``option`` (--init, --teacher), loaded with weights_only=True."""
    from lowbit.checkpoints import CheckpointError, load_state_dict_file

    try:
        return load_state_dict_file(path)
    except CheckpointError as e:
        raise UsageError(f"{option} {e}") from None


def fit_state_dict(model, state: dict, option: str, path: str) -> None:
    """model.load_state_dict(state), with a one-line error when it belongs to another model."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else ""
        raise UsageError(f"{option} {path} does not fit this model (same --model and --data as when it was saved?): "
                         f"{detail[:300]}") from None


def image_source(name: str, notice=print) -> str:
    """The image data set that will really be used: ``name``, or digits with a notice when
    Fashion-MNIST is not installed. A LOWBIT_FASHION_MNIST that names a folder without the files
    is an error, never silently passed over."""
    if name != "fashion-mnist":
        return name
    from lowbit.data.images import ENV_VAR, DatasetNotFound, fashion_mnist_dir

    try:
        fashion_mnist_dir()
        return name
    except DatasetNotFound as e:
        if os.environ.get(ENV_VAR):
            raise UsageError(str(e).splitlines()[0]) from None
        notice(f"notice: {e}\nnotice: falling back to scikit-learn digits (8x8)")
        return "digits"


def load_image_data(name: str, limit: int | None):
    """(train, test) for a name :func:`image_source` has resolved."""
    from lowbit.data import load_images

    return load_images(name, "train", limit), load_images(name, "test")


def image_size(name: str) -> int:
    return 8 if name == "digits" else 28


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
