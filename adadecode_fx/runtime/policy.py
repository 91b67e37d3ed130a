"""The seam between drafting and verifying: what an exit probe proposes, and what the last layer decides.

A generation holds one `Decisions` object. The decode loop asks it two things and nothing else:

- ``draft(run, layer, hidden_last)``: at an exit probe, the early token of every row if the exit is
  taken (every unfinished row confident enough), else ``None``;
- ``judge(run, first, logits)``: at the last layer, a `Verdict` per unfinished row on its pending tokens.

`GreedyDecisions` drafts argmax tokens and judges by argmax equality; `ProcessedGreedyDecisions` does the
same after HF logits processors (repetition penalty, no-repeat n-grams...); `SamplingDecisions` drafts
from the head's processed distribution ``q`` and judges by the speculative-sampling rule. Each takes a
*probe* callable, which tests replace with oracle or adversarial ones.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from .hf_equivalents import multinomial_one
from .sampling import ShortlistLogits, dense_logits, logit_values, processed_scores
from .verify import Verdict, verify_greedy, verify_sampling

# (layer, hidden_last [B, 1, d], rows so far) -> per row (token, confidence); the prediction is for slot len(rows[b])
Probe = Callable[[int, torch.Tensor, list], tuple[list, list]]
# (layer, hidden_last [B, 1, d], rows so far) -> the head's logits [B, V], or `ShortlistLogits` [B, S]
ProbeLogits = Callable[[int, torch.Tensor, list], "torch.Tensor | ShortlistLogits"]


def head_confidence(logits: torch.Tensor) -> torch.Tensor:
    """``logits [..., V]`` -> the softmax's max ``[...]`` in float32 (``-inf`` outside a shortlist)."""
    logits = logits.float()
    return torch.exp(logits.max(-1).values - torch.logsumexp(logits, -1))


class Decisions(Protocol):
    def draft(self, run, layer: int, hidden_last: torch.Tensor) -> list[int] | None: ...

    def judge(self, run, first: int, logits: torch.Tensor) -> dict[int, Verdict]: ...


class GreedyDecisions:
    def __init__(self, probe: Probe, gamma: Callable[[int], float], predictions: Callable):
        self.probe, self.gamma = probe, gamma  # gamma(layer): the exit threshold there
        # logits [B, T, V] -> per row the argmax, read back in one call (`DecodeProgram.read_predictions`)
        self.predictions = predictions

    def draft(self, run, layer, hidden_last):
        tokens, confs = self.probe(layer, hidden_last, run.rows)
        if min(confs[b] for b in run.active()) < self.gamma(layer):
            return None
        return tokens

    def judge(self, run, first, logits):
        """``logits [B, T, V]``: row ``k`` predicts slot ``first + k + 1``."""
        preds = self.predictions(logits)
        return {b: verify_greedy(run.rows[b], first, preds[b]) for b in run.active()}


class ProcessedGreedyDecisions:
    """Greedy decoding after logits processors, as HF's greedy search does it: a position's logits, cast to
    float32, go through the processors with that position's prefix, and the token is their argmax. The
    prefix is the row as HF's loop holds it, left padding included: processors that count the length
    (min length, forced EOS) count the padding as HF does, and HF's repetition penalty skips it.
    ``row_processors`` holds each batch row's processors (`row_processors`). The heads' logits are
    processed the same way; an exit needs every unfinished row's processed max probability to reach the
    layer's threshold."""

    def __init__(self, probe_logits: ProbeLogits, row_processors: list[list], gamma: Callable[[int], float]):
        self.probe_logits, self.row_processors, self.gamma = probe_logits, row_processors, gamma

    def _scores(self, logits: torch.Tensor, prefix: list[int], row: int) -> torch.Tensor:
        return processed_scores(self.row_processors[row], logits, prefix, torch.float32)[0]

    def draft(self, run, layer, hidden_last):
        logits = dense_logits(self.probe_logits(layer, hidden_last, run.rows))
        tokens = [-1] * len(run.rows)
        for b in run.active():
            scores = self._scores(logits[b], run.rows[b], run.batch_row(b))
            if not bool(torch.isfinite(scores).any()) or float(torch.softmax(scores, -1).max()) < self.gamma(layer):
                return None
            tokens[b] = int(scores.argmax())
        return tokens

    def judge(self, run, first, logits):
        """``logits [B, T, V]``: row ``k`` predicts slot ``first + k + 1`` from the slots before it."""
        verdicts = {}
        for b in run.active():
            row = run.rows[b]
            preds = [int(self._scores(logits[b, k], row[:first + k + 1], run.batch_row(b)).argmax())
                     for k in range(logits.shape[1])]
            verdicts[b] = verify_greedy(row, first, preds)
        return verdicts


class SamplingDecisions:
    def __init__(self, probe_logits: ProbeLogits, sampler, gamma: Callable[[int], float]):
        self.probe_logits, self.sampler, self.gamma = probe_logits, sampler, gamma

    def draft(self, run, layer, hidden_last):
        """Per row, ``q`` = the processed head distribution. The exit is taken only if, in every unfinished
        row, both the head's own confidence (its softmax's max, what the threshold is calibrated on in
        greedy decoding: how often the final layer's argmax is the head's) and max q reach the layer's
        threshold; then each row's token is drawn from its q (kept for `judge`). Finished rows get -1.

        Max q alone is not enough: temperature < 1, top-k and top-p sharpen q, so a head that is right
        only 70% of the time can show max q = 1, and the rollbacks then cost more than the exits save
        (measured in docs/benchmarks.md, sampling)."""
        logits = self.probe_logits(layer, hidden_last, run.rows)
        active = run.active()
        gamma = self.gamma(layer)
        values = logit_values(logits)
        if float(head_confidence(values[active]).min()) < gamma:
            return None
        qs = {}
        for b in active:
            q = self.sampler.draft_distribution(logits[b], run.rows[b], run.batch_row(b))
            if q is None or float(q.max()) < gamma:
                return None
            qs[b] = q
        tokens = [-1] * len(run.rows)
        for b, q in qs.items():
            run.drafts[b].append(q)
            tokens[b] = multinomial_one(q, self.sampler.generator)
        return tokens

    def judge(self, run, first, logits):
        verdicts = {}
        for b in run.active():
            pad, row = run.kv.pad[b], run.rows[b]
            probs = self.sampler.distributions(logits[b], row, first, run.batch_row(b))
            v = verify_sampling(row[pad:], first - pad, probs, run.drafts[b], self.sampler.generator)
            verdicts[b] = v if v.rejected_at is None else Verdict(v.accepted, v.rejected_at + pad, v.next_token)
            run.drafts[b].clear()  # every pending token is now accepted or rolled back
        return verdicts
