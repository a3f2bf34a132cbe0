"""What every command line shares: ``--version`` and ``--device`` (no torch import here, so that
``--help`` and ``--version`` answer at once)."""
from __future__ import annotations

import argparse
import re

from . import __version__

DEVICE_HELP = "auto (cuda if present), cpu, cuda or cuda:N"


def device_arg(text: str) -> str:
    """``--device``: the values ``run.device`` takes (checked here, resolved later)."""
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"expected {DEVICE_HELP}, got {text!r}")


def add_common(p: argparse.ArgumentParser) -> None:
    """``--version`` on a command's parser."""
    p.add_argument("--version", action="version", version=f"ppo_tbptt {__version__}")
