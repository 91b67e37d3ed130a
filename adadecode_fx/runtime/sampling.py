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
    get a copy of their own, as in HF's loop; without any, ``logits`` of that dtype are not copied."""
    scores = logits.reshape(1, -1).to(dtype=dtype, copy=bool(processors))
    if processors:
        ids = torch.tensor([prefix], dtype=torch.long, device=scores.device)
        for proc in processors:
            scores = proc(ids, scores)
    return scores


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


class Sampler:
    """One generation's sampling state: the processors and the random source."""

    def __init__(self, config: SamplingConfig, device, batch: int = 1):
        self.config = config
        self.processors = row_processors(config.processors(), batch)  # per row
        self.device = torch.device(device)
        self.generator = None
        if config.seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(config.seed)

    def distribution(self, logits: torch.Tensor, prefix: list[int], row: int = 0) -> torch.Tensor | None:
        """Processed probabilities ``[V]`` for the token after ``prefix`` (batch row ``row``, its padding
        included, as HF's loop passes it) given raw ``logits [V]`` (``-inf`` marks tokens a head cannot
        produce). ``None`` if the processors leave no token possible."""
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        scores = processed_scores(self.processors[row], logits, prefix, dtype)
        if not bool(torch.isfinite(scores).any()):
            return None
        return torch.softmax(scores, dim=-1)[0]

    def distributions(self, logits: torch.Tensor, tokens: list[int], first_row_pos: int, row: int = 0) -> list:
        """Row ``k`` of ``logits [T, V]`` predicts the token after ``tokens[:first_row_pos + k + 1]``."""
        out = []
        for k in range(logits.shape[0]):
            p = self.distribution(logits[k], tokens[:first_row_pos + k + 1], row)
            if p is None:
                raise AdaDecodeError("the logits processors leave no token possible at the final layer")
            out.append(p)
        return out
