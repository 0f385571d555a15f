"""``lowbit dist-train``: pipeline-parallel CharGPT training with compressed stage traffic (AC-SGD).
The options and the run live in :mod:`lowbit.distributed.command`, shared with
``python -m lowbit.distributed`` (what torchrun starts)."""
from __future__ import annotations

import argparse

from lowbit.cli._common import add_command


def register(sub) -> argparse.ArgumentParser:
    from lowbit.distributed.command import add_arguments, run

    d = add_command(sub, "dist-train", "pipeline-parallel CharGPT training with compressed stage traffic (AC-SGD); "
                    "spawns local ranks, or runs as one rank under torchrun")
    add_arguments(d)
    d.set_defaults(func=run)
    return d
