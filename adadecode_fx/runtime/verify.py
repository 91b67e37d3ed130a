"""verify: compare early tokens with the final layer's predictions (greedy rule).

The seam between "deferred work" and "verify/rollback": the final layer produced one prediction per
row of its block; this decides how many early tokens stand and what comes next.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Verdict:
    accepted: int            # early tokens confirmed
    rejected_at: int | None  # index in `tokens` of the first wrong early token, or None
    next_token: int          # the final layer's token at the first unconfirmed index


def verify_greedy(tokens: list[int], first_row_pos: int, predictions: list[int]) -> Verdict:
    """``predictions[k]`` is the final-layer argmax at position ``first_row_pos + k``, i.e. a prediction
    of ``tokens[first_row_pos + k + 1]``. Rows whose target lies beyond ``tokens`` extend the sequence."""
    accepted = 0
    for k, pred in enumerate(predictions):
        target = first_row_pos + k + 1
        if target >= len(tokens):
            return Verdict(accepted, None, pred)
        if tokens[target] != pred:
            return Verdict(accepted, target, pred)
        accepted += 1
    return Verdict(accepted, None, -1)
