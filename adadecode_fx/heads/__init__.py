"""Exit heads: the on-disk format (`format`), how they are trained (`training`) and judged (`evaluation`).

Only the format is imported here: training and evaluation build decoding programs, which sit above the
runtime that this format serves.
"""
from .format import (SHIPPED, ExitHeads, find_shipped_heads, heads_for, model_fingerprint, model_fingerprints,
                     shipped_heads)

__all__ = ["SHIPPED", "ExitHeads", "find_shipped_heads", "heads_for", "model_fingerprint", "model_fingerprints",
           "shipped_heads"]
