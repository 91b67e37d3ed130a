"""Checks of command-line values shared by the ``adadecode`` subcommands."""
from __future__ import annotations

from .errors import AdaDecodeError


def int_list(text, flag) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise AdaDecodeError(f"{flag} must be comma-separated integers such as 8,16; got {text!r}") from None


def at_least(args, **minimums) -> None:
    for name, low in minimums.items():
        if getattr(args, name) < low:
            raise AdaDecodeError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
