"""Where adadecode-fx keeps what it makes once per machine (converted zoo weights, cached captures).

Sits at the bottom of the package (like `errors`): every layer may import it.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``ADADECODE_CACHE``, else ``~/.cache/adadecode_fx``."""
    return Path(os.environ.get("ADADECODE_CACHE") or Path.home() / ".cache" / "adadecode_fx")


__all__ = ["cache_dir"]
