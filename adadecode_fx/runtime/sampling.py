"""Sampling settings for AdaDecode: HF logits processors/warpers applied identically to exit probes and the
final layer, and the random source (a seeded ``torch.Generator``, or torch's global RNG).

Each distribution is computed for one position with the prefix that precedes it, so processors that look
at the sequence (repetition penalty, no-repeat n-grams, min length...) see the right tokens even when
several early tokens are verified in one block. Verification (`verify_sampling`) then applies the
speculative-sampling rule, which makes AdaDecode's output distribution that of plain sampling.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch

from ..errors import AdaDecodeError
from .hf_equivalents import top_p_filter

# Processors whose output for a position depends only on that position's logits and its prefix (no
# hidden state across calls, no extra model calls): safe to call once per position with that prefix.
_SUPPORTED = (
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
    "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper", "TopHLogitsWarper",
    "InfNanRemoveLogitsProcessor", "SuppressTokensLogitsProcessor", "SuppressTokensAtBeginLogitsProcessor",
    "RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "MinLengthLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor", "NoBadWordsLogitsProcessor", "SequenceBiasLogitsProcessor",
    "ForcedEOSTokenLogitsProcessor", "ForcedBOSTokenLogitsProcessor", "LogitNormalization",
    "ExponentialDecayLengthPenalty", "PrefixConstrainedLogitsProcessor",
    # reseeds its generator from the position's prefix on every call: a function of the prefix
    "WatermarkLogitsProcessor",
)


# what to do instead, for refused processors a generate argument makes
_NO_GUIDANCE = ("drop guidance_scale: classifier-free guidance runs the model a second time per token, outside "
                "the decoding program")
_WAY_OUT = {"UnbatchedClassifierFreeGuidanceLogitsProcessor": _NO_GUIDANCE,
            "ClassifierFreeGuidanceLogitsProcessor": _NO_GUIDANCE}


def check_processors(processors, mode: str) -> None:
    """Refuse processors that could not be applied per position (see `_SUPPORTED`)."""
    bad = sorted({type(p).__name__ for p in (processors or ()) if type(p).__name__ not in _SUPPORTED})
    if bad:
        hints = "; ".join(dict.fromkeys(_WAY_OUT[b] for b in bad if b in _WAY_OUT))
        raise AdaDecodeError(
            f"logits processors {bad} are not supported with AdaDecode {mode} (they keep state across "
            f"calls or run other models); " + (f"{hints}. " if hints else "") + f"supported: {', '.join(_SUPPORTED)}")


def row_processors(processors, batch: int) -> list[list]:
    """Per row of a ``batch``, the processors to call with that row alone, as ``[1, length]`` input ids
    (HF's loop calls them with all ``B`` rows at once). What depends on the row is fixed to it: HF's
    repetition penalty holds each row's padding length (``prompt_ignore_length [B]``, built from the
    attention mask), and ``prefix_allowed_tokens_fn(batch_id, ids)`` must get the row's batch index.
    Everything else is shared."""
    return [[_for_row(proc, b, batch) for proc in processors or ()] for b in range(batch)]


def _for_row(proc, b: int, batch: int):
    name = type(proc).__name__
    ignore = getattr(proc, "prompt_ignore_length", None)
    if name == "RepetitionPenaltyLogitsProcessor" and isinstance(ignore, torch.Tensor):
        if ignore.numel() != batch:
            raise AdaDecodeError(f"the repetition penalty's prompt_ignore_length has {ignore.numel()} rows "
                                 f"for a batch of {batch}: build it for this batch")
        proc = copy.copy(proc)
        proc.prompt_ignore_length = ignore[b:b + 1]
    elif name == "PrefixConstrainedLogitsProcessor" and batch > 1:
        proc = copy.copy(proc)
        proc._prefix_allowed_tokens_fn = functools.partial(_as_row, proc._prefix_allowed_tokens_fn, b)
    return proc


def _as_row(fn, row: int, _batch_id: int, ids: torch.Tensor):
    return fn(row, ids)


def processed_scores(processors, logits: torch.Tensor, prefix: list[int], dtype) -> torch.Tensor:
    """``logits [V]`` for the token after ``prefix`` as ``dtype`` through ``processors`` (``[1, V]``), each
    called with the prefix as its input ids, as HF's decoding loop calls them for that position. Processors
    get a copy of their own, as in HF's loop; without any, ``logits`` of that dtype are not copied. HF's
    top-p gives its result without a sort of the vocabulary where it can (`top_p_filter`)."""
    scores = logits.reshape(1, -1).to(dtype=dtype, copy=bool(processors))
    if processors:
        ids = torch.tensor([prefix], dtype=torch.long, device=scores.device)
        for proc in processors:
            scores = top_p_filter(proc, ids, scores) if type(proc).__name__ == "TopPLogitsWarper" else proc(ids, scores)
    return scores


@dataclass(frozen=True)
class ShortlistLogits:
    """A head's logits over its vocabulary shortlist: ``values [..., S]`` for the token ids ``vocab [S]`` of
    a ``size``-token vocabulary, every other token ``-inf``. Confidence and drafts without processors
    before the warpers need only these S values; `dense` is what a logits processor gets."""

    values: torch.Tensor
    vocab: torch.Tensor
    size: int

    def __getitem__(self, row) -> "ShortlistLogits":
        return ShortlistLogits(self.values[row], self.vocab, self.size)

    def dense(self) -> torch.Tensor:
        """``[..., size]``: the values at their token ids, ``-inf`` elsewhere."""
        full = self.values.new_full((*self.values.shape[:-1], self.size), float("-inf"))
        return full.index_copy_(-1, self.vocab, self.values)


def dense_logits(logits) -> torch.Tensor:
    return logits.dense() if isinstance(logits, ShortlistLogits) else logits


def logit_values(logits) -> torch.Tensor:
    """The logits a head computed: a shortlist's S values, or the dense ``[.., V]`` tensor."""
    return logits.values if isinstance(logits, ShortlistLogits) else logits


@dataclass
class SamplingConfig:
    """How AdaDecode samples (``AdaDecoder.generate(..., sampling=SamplingConfig(...))`` or
    ``generate(..., do_sample=True, temperature=..., top_k=..., top_p=..., min_p=..., seed=...)``).

    temperature, top_k, top_p, min_p: as in HF (``None`` = off); built into HF warpers, applied after
        ``logits_processor``.
    logits_processor: an HF ``LogitsProcessorList`` (e.g. the one HF ``generate`` prepares), applied
        first. Only processors without state across calls are accepted (see ``_SUPPORTED``); each is called
        per position with that position's prefix, for exit probes and the final layer alike.
    seed: seeds a private ``torch.Generator``, so the same seed gives the same tokens. ``None`` draws from
        torch's global RNG (reproducible with ``torch.manual_seed``, as HF sampling is).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    logits_processor: object = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise AdaDecodeError(f"temperature must be a positive number, got {t!r} (for greedy decoding use "
                                 "do_sample=False)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise AdaDecodeError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise AdaDecodeError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.min_p is not None and not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise AdaDecodeError(f"min_p must be in [0, 1] or None, got {self.min_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise AdaDecodeError(f"seed must be an integer or None, got {self.seed!r}")
        check_processors(self.logits_processor, "sampling")

    def processors(self) -> list:
        from transformers.generation import logits_process as lp

        out = list(self.logits_processor or ())
        if self.temperature != 1.0:
            out.append(lp.TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k is not None:
            out.append(lp.TopKLogitsWarper(self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            out.append(lp.TopPLogitsWarper(float(self.top_p)))
        if self.min_p is not None and self.min_p > 0:
            out.append(lp.MinPLogitsWarper(float(self.min_p)))
        return out


def warped_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, dtype=torch.float32) -> torch.Tensor | None:
    """``logits [V]`` -> probabilities ``[V]`` after temperature, top-k, top-p and min-p, in that order (as
    `SamplingConfig.processors` builds HF's warpers), computed over the candidates they can keep: a top-k of
    ``top_k`` tokens, or for top-p alone the fewest top tokens holding ``top_p`` of the mass (found by a
    top-k that grows), never a sort of the whole vocabulary. The same distribution as HF's warpers up to
    rounding and ties at a cut-off. ``None`` if no token is possible (all ``-inf``)."""
    scores = logits.to(dtype)
    if temperature != 1.0:
        scores = scores / temperature
    V = scores.numel()
    lse = torch.logsumexp(scores, 0)
    if not bool(torch.isfinite(lse)):
        return None
    cut_p = top_p is not None and top_p < 1.0
    if top_k is None and not cut_p:  # every token stays a candidate: no top-k, no sort
        probs = torch.exp(scores - lse)
        if min_p is not None and min_p > 0:
            probs = torch.where(probs >= min_p * probs.max(), probs, 0)
            probs = probs / probs.sum()
        return probs
    k = min(top_k or 64, V)
    top = torch.topk(scores, k)  # sorted, largest first
    if top_k is not None and k < V:  # as HF's top-k, every token tied with the k-th stays
        tied = int((scores >= top.values[-1]).sum())
        if tied > k:
            top = torch.topk(scores, tied)
    while top_k is None and k < V and float(torch.exp(top.values - lse).sum()) < top_p:
        k = min(k * 8, V)
        top = torch.topk(scores, k)
    finite = torch.isfinite(top.values)  # a shortlist's -inf never survives
    vals, idx = top.values[finite], top.indices[finite]
    if top_k is not None:  # top-p and min-p then see the top-k's scores alone, renormalized
        lse = torch.logsumexp(vals, 0)
    probs = torch.exp(vals - lse)
    keep = len(vals)
    if cut_p:  # the fewest top tokens whose mass reaches top_p (at least one)
        keep = max(1, int(((torch.cumsum(probs, 0) - probs) < top_p).sum()))
        probs = torch.softmax(vals[:keep], 0)
    if min_p is not None and min_p > 0:
        keep = max(1, int((probs[:keep] >= min_p * probs[0]).sum()))
    out = torch.zeros(V, dtype=dtype, device=logits.device)
    out[idx[:keep]] = torch.softmax(vals[:keep], 0)
    return out


# HF's standard warpers, in the order HF's generate and `SamplingConfig.processors` append them, and the
# `warped_probs` setting each one carries
_WARPERS = {"TemperatureLogitsWarper": "temperature", "TopKLogitsWarper": "top_k", "TopPLogitsWarper": "top_p",
            "MinPLogitsWarper": "min_p"}


def split_warpers(processors) -> tuple[list, dict] | None:
    """``processors`` -> (those before the trailing standard warpers, those warpers' `warped_probs`
    settings). HF's ``generate`` prepares its list that way: processors first (repetition penalty...),
    then temperature, top-k, top-p, min-p. ``None`` where a trailing warper is out of that order,
    repeated, or not at its default filter value and minimum of one token kept."""
    procs, settings = list(processors or ()), {}
    order = list(_WARPERS.values())
    while procs and type(procs[-1]).__name__ in _WARPERS:
        warper = procs.pop()
        key = _WARPERS[type(warper).__name__]
        later = [k for k in settings if order.index(k) <= order.index(key)]
        if later or getattr(warper, "filter_value", -math.inf) != -math.inf or \
                getattr(warper, "min_tokens_to_keep", 1) != 1:
            return None
        settings[key] = getattr(warper, key)
    return procs, settings


class Sampler:
    """One generation's sampling state: the processors and the random source."""

    def __init__(self, config: SamplingConfig, device, batch: int = 1):
        self.config = config
        self.processors = row_processors(config.processors(), batch)  # per row
        self.draft_warpers = [split_warpers(procs) for procs in self.processors]  # per row, for drafts
        self.device = torch.device(device)
        self.generator = None
        if config.seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(config.seed)

    def distribution(self, logits: torch.Tensor, prefix: list[int], row: int = 0) -> torch.Tensor | None:
        """Processed probabilities ``[V]`` for the token after ``prefix`` (batch row ``row``, its padding
        included, as HF's loop passes it) given raw ``logits [V]`` (``-inf`` marks tokens a head cannot
        produce). ``None`` if the processors leave no token possible."""
        logits = dense_logits(logits)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        scores = processed_scores(self.processors[row], logits, prefix, dtype)
        if not bool(torch.isfinite(scores).any()):
            return None
        return torch.softmax(scores, dim=-1)[0]

    def draft_distribution(self, logits: torch.Tensor, prefix: list[int], row: int = 0) -> torch.Tensor | None:
        """The distribution ``q [V]`` an early token is drawn from. Speculative sampling is lossless for any
        ``q`` the draft is really drawn from, so the trailing standard warpers (`split_warpers`: HF's
        ``generate`` and `SamplingConfig` put them last) are applied by `warped_probs` over the few
        candidates they keep, not by HF's warpers over the whole vocabulary: HF's top-p sorts all of it,
        5 ms for Qwen2.5's 151,936 tokens on the CPU, about two decoder layers of that model, on every
        probe. The processors before them run as HF's. Without any, a head's `ShortlistLogits` are warped
        over the shortlist alone. The final layer's distribution stays HF's (`distribution`)."""
        split = self.draft_warpers[row]
        if split is None:
            return self.distribution(logits, prefix, row)
        first, warpers = split
        values = logit_values(logits)
        dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
        if isinstance(logits, ShortlistLogits) and not first:
            q = warped_probs(values.reshape(-1), dtype=dtype, **warpers)
            if q is None:
                return None
            return torch.zeros(logits.size, dtype=dtype, device=q.device).index_copy_(0, logits.vocab, q)
        logits = dense_logits(logits)
        scores = processed_scores(first, logits, prefix, dtype)[0] if first else logits.reshape(-1)
        return warped_probs(scores, dtype=dtype, **warpers)

    def distributions(self, logits: torch.Tensor, tokens: list[int], first_row_pos: int, row: int = 0) -> list:
        """Row ``k`` of ``logits [T, V]`` predicts the token after ``tokens[:first_row_pos + k + 1]``."""
        out = []
        for k in range(logits.shape[0]):
            p = self.distribution(logits[k], tokens[:first_row_pos + k + 1], row)
            if p is None:
                raise AdaDecodeError("the logits processors leave no token possible at the final layer")
            out.append(p)
        return out
