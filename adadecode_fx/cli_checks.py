"""Checks of command-line values shared by the ``adadecode`` subcommands."""
from __future__ import annotations

from .errors import AdaDecodeError

# the --heads help's default, as `adadecode_fx.heads.heads_for` finds them
HEADS_DEFAULT = "(default: the heads shipped for this model: a zoo name or a local copy of its checkpoint)"


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


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def stop_strings(values) -> list[str] | None:
    """--stop values with ``\\n``, ``\\t`` and ``\\\\`` read as a newline, a tab and a backslash (a shell
    passes them as two characters); an empty one is refused."""
    if not values:
        return None
    out = []
    for text in values:
        chars, i = [], 0
        while i < len(text):
            if text[i] == "\\" and text[i + 1:i + 2] in _ESCAPES:
                chars.append(_ESCAPES[text[i + 1]])
                i += 2
            else:
                chars.append(text[i])
                i += 1
        if not chars:
            raise AdaDecodeError("--stop is empty: give the text that ends a row (e.g. --stop '\\n\\n')")
        out.append("".join(chars))
    return out
