"""Two steps of HF sampling computed faster, with bit-identical results on the CPU.

Sampling from a 151,936-token vocabulary spends most of its host time in two calls that touch every
token although a handful can be drawn: HF's top-p sorts the whole vocabulary (2.7 ms on Qwen2.5's, CPU)
and ``torch.multinomial`` draws one exponential variate per token (3.4 ms). Both run once per sampled
token, so they cost about a tenth of a decode step on Qwen2.5-Coder-0.5B. Here each is replaced by a
computation that gives the very same tensor, token and generator state, so a seeded run still draws
HF's tokens (tests/runtime/test_hf_equivalents.py); where that cannot be guaranteed, the original runs.
"""
from __future__ import annotations

import functools
import math

import torch

# past this many candidates, building the sorted vector costs what HF's sort does
_TOP_P_MAX_CANDIDATES = 4096


def top_p_filter(warper, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``warper(input_ids, scores)`` for HF's ``TopPLogitsWarper``, without sorting the vocabulary when at
    most `_TOP_P_MAX_CANDIDATES` tokens are not ``-inf`` (after a top-k, HF's order). HF's warper sorts
    ``scores [1, V]`` ascending, so its sorted vector is the ``-inf`` entries followed by the candidates in
    ascending order: that vector is built directly and goes through the same softmax and cumulative sum,
    so the cut falls where HF's does. HF's sort is not stable: where tokens tied in score lie on both
    sides of the cut, which of them HF removes depends on its sort, and the warper itself runs."""
    if scores.dim() != 2 or scores.shape[0] != 1 or scores.device.type != "cpu" or \
            warper.filter_value != -math.inf:
        return warper(input_ids, scores)
    row = scores[0]
    candidates = row[row != -math.inf]
    n, V = candidates.numel(), row.numel()
    if n == 0 or n > _TOP_P_MAX_CANDIDATES or not bool(torch.isfinite(candidates).all()):
        return warper(input_ids, scores)
    ascending = torch.sort(candidates).values
    sorted_logits = torch.full_like(row, -math.inf)
    sorted_logits[V - n:] = ascending
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - warper.top_p)
    remove[-warper.min_tokens_to_keep:] = False
    cut = int(remove[V - n:].sum())  # candidates removed: a prefix of the ascending ones (the sum only grows)
    if cut == 0:
        return scores.clone()
    if cut < n and bool(ascending[cut - 1] == ascending[cut]):
        return warper(input_ids, scores)
    return scores.masked_fill(scores <= ascending[cut - 1], -math.inf)


def multinomial_one(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """``int(torch.multinomial(probs, 1, generator=generator))`` for ``probs [V]`` (float32 or float64),
    leaving the generator as that call leaves it. torch draws ``argmax(probs / E)`` with ``E`` one Exp(1)
    variate per token, each ``-log1p(-u)`` of a float64 uniform ``u``. On the CPU this draws the same
    uniforms (0.85 ms for Qwen2.5's vocabulary instead of 3.4 ms) and takes the log only where
    ``probs > 0``. Used only after `_same_as_multinomial` has seen it match torch in this process."""
    if probs.device.type != "cpu" or probs.dim() != 1 or probs.dtype not in (torch.float32, torch.float64) \
            or not _same_as_multinomial():
        return int(torch.multinomial(probs, 1, generator=generator))
    return _emulated(probs, generator)


def _emulated(probs: torch.Tensor, generator) -> int:
    u = torch.empty(probs.numel(), dtype=torch.float64, device=probs.device)  # not torch's default device
    return _argmax_draw(probs, u.uniform_(generator=generator))


def _argmax_draw(probs: torch.Tensor, u: torch.Tensor) -> int:
    """torch's ``argmax(probs / E)`` with ``E = -log1p(-u)`` cast to ``probs``' dtype, given the uniforms
    ``u [V]``, taking the log only where ``probs > 0`` (elsewhere ``0 / E`` is 0, never the max)."""
    if bool((u == 0).any()):  # E = 0: torch's 0 / 0 is NaN, which its argmax picks; follow it exactly
        return int(torch.argmax(probs / (-torch.log1p(-u)).to(probs.dtype)))
    support = probs.nonzero().flatten()
    chosen = probs[support]
    if support.numel() == 0 or not bool(torch.isfinite(chosen).all()) or bool((chosen < 0).any()):
        raise RuntimeError("invalid multinomial distribution: a probability is inf, nan or negative, or they "
                           "sum to 0")
    return int(support[torch.argmax(chosen / (-torch.log1p(-u[support])).to(probs.dtype))])


@functools.cache
def _same_as_multinomial() -> bool:
    """Whether `_emulated` draws torch's tokens and leaves its generator as torch does, on sparse and dense
    distributions of both dtypes; checked once per process, since it relies on how this torch build
    samples."""
    for seed in range(8):
        g = torch.Generator().manual_seed(10_000 + seed)
        size = 1000 + 997 * seed
        probs = torch.rand(size, generator=g, dtype=torch.float64, device="cpu")
        if seed % 2:
            probs = torch.where(torch.rand(size, generator=g, dtype=torch.float64, device="cpu") < 0.01, probs, 0)
        probs = (probs / probs.sum()).to(torch.float32 if seed % 4 < 2 else torch.float64)
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(3):
            if _emulated(probs, ours) != int(torch.multinomial(probs, 1, generator=theirs)):
                return False
        if not torch.equal(ours.get_state(), theirs.get_state()):
            return False
    return True
