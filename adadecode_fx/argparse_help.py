"""The help layout of every adadecode command line (``adadecode ...`` and ``bench/run_bench.py``)."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, except where the help already explains the default
    or there is none to show (None, an empty string, False: a flag that is off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default == "" or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


__all__ = ["HelpFormatter"]
