"""What the passes are told: one dataclass, defaults in one place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..heads.format import ExitHeads


@dataclass(frozen=True)
class PassSettings:
    """exit_layers: decoder layers after which `insert_exit_probes` adds a probe (empty: none).
    heads: the `ExitHeads` whose adapters those probes apply (needed when exit_layers is not empty).
    attention_windows: per decoder layer, the keys a one-row step of it attends over in HF's cache (a
    sliding window W > 0, an attention chunk C as -C; 0: every key), `capture.attention_windows`.
    Empty: every key."""
    exit_layers: tuple[int, ...] = ()
    heads: "ExitHeads | None" = None
    attention_windows: tuple[int, ...] = ()
