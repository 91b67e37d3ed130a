"""One line on stderr before a slow one-time step (converting weights, capturing, building a kernel,
compiling), saying what runs, roughly how long it takes and what is kept afterwards, so a first run
is never a long silence. ``ADADECODE_QUIET=1`` turns them off.

Sits at the bottom of the package (like `errors`): every layer may import it.
"""
from __future__ import annotations

import os
import sys


def notice(message: str) -> None:
    if os.environ.get("ADADECODE_QUIET", "") not in ("", "0"):
        return
    print(f"[adadecode] {message}", file=sys.stderr, flush=True)


def roughly(seconds: float) -> str:
    """A duration as a person would estimate it: 'about 20 s', 'about 2 min'."""
    if seconds < 90:
        return f"about {max(5, int(round(seconds / 5.0)) * 5)} s"
    return f"about {round(seconds / 60.0)} min"


__all__ = ["notice", "roughly"]
