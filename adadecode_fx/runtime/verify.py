"""verify: decide which early tokens stand, from the final layer's predictions.

The seam between "deferred work" and "verify/rollback": the final layer produced one prediction per
row of its block; this decides how many early tokens stand and what comes next. `verify_greedy` compares
argmaxes; `verify_sampling` applies the speculative-sampling rule, which keeps the output distribution
that of plain sampling from the final layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .hf_equivalents import multinomial_one


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


# --- sampling ------------------------------------------------------------------------------------------
def accept_early(p_x: float, q_x: float, u: float) -> bool:
    """Accept an early token ``x`` drawn from the head's ``q`` with probability ``min(1, p(x) / q(x))``
    (``u`` uniform in [0, 1))."""
    return u * q_x < p_x


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where to draw from after a rejection: ``norm(max(0, p - q))``; ``p`` itself if that is empty
    (``p == q`` up to rounding, where a rejection has probability ~0)."""
    r = (p - q).clamp_min(0)
    total = r.sum()
    return r / total if float(total) > 0 else p


def verify_sampling(tokens: list[int], first_row_pos: int, probs, drafts, generator=None) -> Verdict:
    """Speculative-sampling verification.

    ``probs[k]`` is the final layer's processed distribution ``[V]`` at position ``first_row_pos + k``
    (predicting ``tokens[first_row_pos + k + 1]``); ``drafts`` holds, for the last ``len(drafts)`` tokens
    (the pending early ones), the distribution ``q`` each was drawn from. Each early token ``x`` in order is
    accepted with probability ``min(1, p(x)/q(x))``; the first rejected one is replaced by a draw from
    ``norm(max(0, p - q))`` and everything after it goes. If every row's target is accepted and a row
    predicts past ``tokens``, the next token is drawn from that row's ``p``. The result is distributed
    exactly as plain sampling from the final layer (Leviathan et al. 2023, Chen et al. 2023).
    ``generator``: a ``torch.Generator`` or ``None`` (torch's global RNG).
    """
    accepted = 0
    n_drafted = len(tokens) - len(drafts)
    for k, p in enumerate(probs):
        target = first_row_pos + k + 1
        if target >= len(tokens):
            return Verdict(accepted, None, multinomial_one(p, generator))
        if target < n_drafted:  # already final (not an early token): nothing to decide
            continue
        q = drafts[target - n_drafted]
        x = tokens[target]
        u = float(torch.rand((), generator=generator, device=p.device))
        if accept_early(float(p[x]), float(q[x]), u):
            accepted += 1
            continue
        return Verdict(accepted, target, multinomial_one(residual(p, q.to(p.dtype)), generator))
    return Verdict(accepted, None, -1)
