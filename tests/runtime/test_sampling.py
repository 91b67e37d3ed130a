"""Sampling: verification by the speculative-sampling rule keeps the output distribution that of plain
sampling; a broken acceptance rule is caught; seeded runs repeat; greedy is untouched.

The distribution check: untrained ("logit lens") heads after layer 3 of 5 and a tiny threshold make every
token after the first an early token (max_pending=2); about 30% of them are rejected. Over N seeds we sample the first 3 new tokens and compare the
empirical joint distribution with the *exact* one computed from the model's logits (temperature + top-k,
so at most TOP_K**3 outcomes). Tolerance on the total-variation distance (TV):
    E[TV] <= 1/2 * sum_x sqrt(p(x)(1 - p(x)) / N)                      (Jensen, per outcome)
and TV is a function of N independent draws that moves by at most 1/N when one draw changes, so by
McDiarmid P(TV >= E[TV] + t) <= exp(-2 N t^2); t = sqrt(ln(1/delta) / (2N)) with delta = 1e-4.
With N = 1500 and 64 outcomes the tolerance is 0.158; measured TV: correct rule 0.069 (full-vocabulary
head) and 0.072 (shortlist head), "always accept" 0.57, "resample from p instead of norm(max(0, p - q))" 0.29.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import adadecode_fx
from adadecode_fx import AdaDecodeConfig, AdaDecodeError, AdaDecoder, ExitHeads, SamplingConfig
from adadecode_fx.runtime import verify

from tests.conftest import hf_greedy, tiny_model

PROMPT = [5, 6, 7, 8]
NEW = 3
TEMPERATURE, TOP_K = 1.5, 4
N = 1500
DELTA = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    # thousands of tiny generations: intra-op threads only add synchronisation (20-50x slower on 2 busy cores)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _decoder(shortlist: bool = False, max_pending: int = 2) -> AdaDecoder:
    model = tiny_model("llama")
    heads = ExitHeads.identity(model, (3,))
    if shortlist:  # the heads score only even ids: q is zero elsewhere
        heads.vocab = torch.arange(0, model.config.vocab_size, 2)
    return AdaDecoder(model, heads, AdaDecodeConfig(threshold=1e-6, max_pending=max_pending))


def _processed(logits: torch.Tensor) -> torch.Tensor:
    """Plain sampling's distribution, written out independently of HF and of adadecode_fx."""
    scores = logits / TEMPERATURE
    kth = scores.topk(TOP_K, dim=-1).values[..., -1:]
    return torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1)


@torch.no_grad()
def exact_joint(model, prompt: list[int], n: int) -> dict[tuple, float]:
    """P(first n new tokens) under plain sampling, from the model's logits (one batched forward per depth)."""
    joint = {(): 1.0}
    for _ in range(n):
        seqs = list(joint)
        ids = torch.tensor([prompt + list(s) for s in seqs])
        probs = _processed(model(ids).logits[:, -1].double())
        joint = {s + (t,): joint[s] * float(probs[i, t])
                 for i, s in enumerate(seqs) for t in torch.nonzero(probs[i]).flatten().tolist()}
    return joint


def tolerance(exact: dict, n: int) -> float:
    expected = 0.5 * sum(math.sqrt(p * (1 - p) / n) for p in exact.values())
    return expected + math.sqrt(math.log(1 / DELTA) / (2 * n))


def sample_tokens(dec: AdaDecoder, n: int):
    counts, totals = Counter(), Counter()
    for seed in range(n):
        out = dec.generate(PROMPT, max_new_tokens=NEW, eos_token_id=None, do_sample=True,
                           temperature=TEMPERATURE, top_k=TOP_K, seed=seed)
        counts[tuple(out.new_tokens)] += 1
        totals.update(accepted=out.stats.accepted, rejected=out.stats.rejected, early=out.stats.early_emitted)
    return counts, totals


def tv_distance(counts: Counter, exact: dict, n: int) -> float:
    keys = set(counts) | set(exact)
    return 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in keys)


@pytest.fixture(scope="module")
def exact():
    return exact_joint(tiny_model("llama"), PROMPT, NEW)


@pytest.mark.parametrize("shortlist", [False, True], ids=["full-vocab-head", "shortlist-head"])
def test_output_distribution_equals_plain_sampling(exact, shortlist):
    dec = _decoder(shortlist)
    counts, totals = sample_tokens(dec, N)
    # the check has teeth only if both branches of the rule run often
    assert totals["early"] >= N and totals["accepted"] >= N // 5 and totals["rejected"] >= N // 5, totals
    assert set(counts) <= set(exact), "a token outside top-k was produced"
    tv, tol = tv_distance(counts, exact, N), tolerance(exact, N)
    assert tv < tol, f"TV {tv:.3f} >= tolerance {tol:.3f} ({totals})"


BROKEN = {
    # take every early token as is: the output follows the heads, not the model
    "always-accept": ("accept_early", lambda p_x, q_x, u: True),
    # right acceptance, but resample from p instead of norm(max(0, p - q)): over-weights what q liked
    "resample-from-p": ("residual", lambda p, q: p),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_acceptance_rule_is_caught(exact, monkeypatch, name):
    attr, broken = BROKEN[name]
    monkeypatch.setattr(verify, attr, broken)
    counts, _ = sample_tokens(_decoder(), N)
    tv, tol = tv_distance(counts, exact, N), tolerance(exact, N)
    assert tv > tol, f"the broken rule {name!r} went unnoticed: TV {tv:.3f} <= tolerance {tol:.3f}"


def test_seeded_runs_repeat_and_seeds_differ():
    dec = _decoder(max_pending=3)
    runs = [dec.generate(PROMPT, max_new_tokens=24, do_sample=True, temperature=1.2, top_p=0.9, seed=s).new_tokens
            for s in (11, 11, 12)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    # seed=None draws from torch's global RNG: torch.manual_seed makes it repeat
    again = []
    for _ in range(2):
        torch.manual_seed(3)
        again.append(dec.generate(PROMPT, max_new_tokens=24, do_sample=True, top_k=8).new_tokens)
    assert again[0] == again[1]


def test_top_k_1_is_greedy_and_greedy_is_unchanged():
    model = tiny_model("llama")
    dec = _decoder(max_pending=3)
    ref = hf_greedy(model, PROMPT, 30)
    greedy = dec.generate(PROMPT, max_new_tokens=30, eos_token_id=None)
    sampled = dec.generate(PROMPT, max_new_tokens=30, eos_token_id=None, do_sample=True, top_k=1, seed=5)
    assert greedy.new_tokens == ref
    assert sampled.new_tokens == ref
    assert sampled.stats.early_emitted > 0 and sampled.stats.rejected > 0


def _hf_sample(model, heads, **kw):
    ids = torch.tensor([PROMPT])
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, pad_token_id=0,
                          max_new_tokens=20, custom_generate=adadecode_fx.generate, exit_heads=heads,
                          adadecode={"threshold": 1e-6, "max_pending": 3}, **kw)[0, len(PROMPT):].tolist()


def test_custom_generate_samples_reproducibly():
    model = tiny_model("llama")
    heads = ExitHeads.random(model, (1, 3), seed=1)
    seeded = [_hf_sample(model, heads, top_k=5, temperature=0.9, seed=21) for _ in range(2)]
    assert seeded[0] == seeded[1] and len(seeded[0]) == 20
    assert _hf_sample(model, heads, top_k=5, temperature=0.9, seed=22) != seeded[0]
    manual = []
    for _ in range(2):
        torch.manual_seed(0)
        manual.append(_hf_sample(model, heads, top_k=5, temperature=0.9))
    assert manual[0] == manual[1]


def test_prefix_dependent_processors_see_the_right_prefix():
    """Repetition penalty depends on the tokens before each position; with top_k=1 sampling is
    deterministic, so AdaDecode (many early tokens verified per block) must equal HF token for token."""
    model = tiny_model("llama")
    heads = ExitHeads.random(model, (1, 3), seed=1)
    ids = torch.tensor([PROMPT])
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, top_k=1, repetition_penalty=3.0,
              no_repeat_ngram_size=2, max_new_tokens=30, pad_token_id=0)
    ref = model.generate(ids, **kw)
    plain_greedy = hf_greedy(model, PROMPT, 30)
    assert ref[0, len(PROMPT):].tolist() != plain_greedy  # the processors matter here
    ours = model.generate(ids, custom_generate=adadecode_fx.generate, exit_heads=heads,
                          adadecode={"threshold": 1e-6, "max_pending": 3}, **kw)
    assert ours.tolist() == ref.tolist()


class _Stateful(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores


def test_unsupported_settings_are_refused():
    model = tiny_model("llama")
    heads = ExitHeads.random(model, (1, 3), seed=1)
    ids = torch.tensor([PROMPT])
    with pytest.raises(AdaDecodeError, match="_Stateful"):
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=3, pad_token_id=0,
                       logits_processor=LogitsProcessorList([_Stateful()]),
                       custom_generate=adadecode_fx.generate, exit_heads=heads)
    with pytest.raises(AdaDecodeError, match="beam search"):
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, num_beams=2, max_new_tokens=3,
                       pad_token_id=0, custom_generate=adadecode_fx.generate, exit_heads=heads)
    dec = _decoder()
    with pytest.raises(AdaDecodeError, match="do_sample=True"):
        dec.generate(PROMPT, max_new_tokens=3, top_k=4)
    with pytest.raises(AdaDecodeError, match="temperature"):
        SamplingConfig(temperature=0.0)


WARPS = [{"temperature": 0.7, "top_k": 20, "top_p": 0.8}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.7},
         {"top_k": 5}, {"min_p": 0.1}, {"temperature": 1.3, "top_p": 0.95, "min_p": 0.05},
         {"top_p": 0.5, "top_k": 50}, {"top_p": 0.999}]


@pytest.mark.parametrize("scale", [1.0, 4.0], ids=["flat", "peaked"])
def test_warped_probs_is_hfs_warpers_over_the_candidates(scale):
    """The draft distribution of a probe without logits processors: HF's warpers' result, computed over
    the candidates they keep (float64, no ties: equal up to rounding, the same support)."""
    from adadecode_fx.runtime.sampling import Sampler, warped_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5000, generator=g, dtype=torch.float64) * scale
    logits[::3] = float("-inf")  # a shortlist head: -inf outside it
    for kw in WARPS:
        ref = Sampler(SamplingConfig(**kw), "cpu").distribution(logits, [1, 2, 3])
        got = warped_probs(logits, dtype=torch.float64, **kw)
        assert torch.equal(ref > 0, got > 0), kw
        assert torch.allclose(ref, got, rtol=0, atol=1e-12), kw
    assert warped_probs(torch.full((10,), float("-inf")), top_k=3) is None


def test_warped_probs_keeps_every_token_tied_with_the_kth_as_hf():
    from adadecode_fx.runtime.sampling import warped_probs

    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.0])
    assert (warped_probs(logits, top_k=2) > 0).tolist() == [True, True, True, True, False, False]


def test_drafts_apply_the_trailing_warpers_over_their_candidates(monkeypatch):
    """A probe's q: the processors before HF's standard warpers as HF runs them, the warpers through
    `warped_probs` (HF's top-p sorts the whole vocabulary on every probe). HF's generate prepares its list
    that way, so `custom_generate` takes the same path; a warper that is not at its defaults goes to HF's."""
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)
    from adadecode_fx.runtime import sampling

    seen = []
    real = sampling.warped_probs

    def counted(*a, **k):
        seen.append(k)
        return real(*a, **k)
    monkeypatch.setattr(sampling, "warped_probs", counted)
    dec = _decoder()
    out = dec.generate(PROMPT, max_new_tokens=6, eos_token_id=None, do_sample=True, top_p=0.9, seed=0)
    assert out.stats.early_emitted > 0 and len(seen) >= out.stats.early_emitted
    assert seen[0] == {"dtype": torch.float64, "top_p": 0.9}

    penalty = RepetitionPenaltyLogitsProcessor(1.3)
    first, warpers = sampling.split_warpers([penalty, TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                                             TopPLogitsWarper(0.8)])
    assert first == [penalty] and warpers == {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
    assert sampling.split_warpers([TopPLogitsWarper(0.8), TopKLogitsWarper(20)]) is None  # not HF's order
    assert sampling.split_warpers([TopKLogitsWarper(20, filter_value=-1e4)]) is None

    seen.clear()  # HF's own list, through custom_generate: its penalty first, then its warpers
    model = tiny_model("llama")
    ids = torch.tensor([PROMPT])
    model.generate(ids, attention_mask=torch.ones_like(ids), custom_generate=adadecode_fx.generate,
                   exit_heads=ExitHeads.identity(model, (3,)), adadecode={"threshold": 1e-6, "max_pending": 2},
                   do_sample=True, temperature=0.7, top_k=5, top_p=1.0, repetition_penalty=1.3, max_new_tokens=6,
                   pad_token_id=0)
    assert seen and seen[0] == {"dtype": torch.float64, "temperature": 0.7, "top_k": 5}
    seen.clear()
    broken = LogitsProcessorList([TopKLogitsWarper(5, filter_value=-1e4)])
    dec.generate(PROMPT, max_new_tokens=6, eos_token_id=None, do_sample=True, seed=0, logits_processor=broken)
    assert not seen  # a warper not at its defaults: q from HF's processors


@pytest.mark.parametrize("confidence,exits", [(0.3, False), (0.9, True)])
def test_an_exit_needs_the_heads_own_confidence_not_only_a_sharp_q(confidence, exits):
    """top_k=1 makes every q one-hot (max q = 1): the exit must still wait for the head's own softmax to
    reach the threshold, which is what the threshold is calibrated on."""
    model = tiny_model("llama")
    dec = AdaDecoder(model, ExitHeads.identity(model, (3,)), AdaDecodeConfig(threshold=0.5, max_pending=2))
    V = model.config.vocab_size
    top = math.log(confidence * (V - 1) / (1 - confidence))  # softmax(top, 0, 0, ...) gives it `confidence`

    def head_logits(layer, hidden_last, rows):
        logits = torch.zeros(hidden_last.shape[0], V, dtype=torch.float64)
        logits[:, 7] = top
        return logits
    dec.exit_logits = head_logits
    out = dec.generate(PROMPT, max_new_tokens=8, eos_token_id=None, do_sample=True, top_k=1, seed=0)
    assert (out.stats.early_emitted > 0) == exits, out.stats
    assert out.new_tokens == hf_greedy(model, PROMPT, 8)  # top-k 1 is greedy, whatever the heads draft


def test_a_shortlist_heads_draft_is_warped_over_its_shortlist():
    """A head with a shortlist hands its S logits over (`ShortlistLogits`), not V with -inf elsewhere:
    confidence and drafts without processors before the warpers need only those S values (0.6 + 0.7 ms a
    probe on Qwen2.5's 151,936 tokens otherwise). q is the dense computation's, up to rounding; a
    processor before the warpers still gets the whole vocabulary."""
    from transformers import RepetitionPenaltyLogitsProcessor
    from adadecode_fx.runtime.sampling import Sampler, ShortlistLogits

    dec = _decoder(shortlist=True)
    V = dec.vocab_size
    hidden = torch.randn(2, 1, tiny_model("llama").config.hidden_size, dtype=torch.float64)
    logits = dec.exit_logits(3, hidden, [[1], [2]])
    assert isinstance(logits, ShortlistLogits) and logits.values.shape == (2, V // 2)
    dense = logits.dense()
    assert dense.shape == (2, V) and torch.isinf(dense[:, 1::2]).all() and torch.equal(dense[:, ::2], logits.values)
    sampler = Sampler(SamplingConfig(temperature=0.7, top_k=5, top_p=0.9), "cpu")
    for b in range(2):
        q = sampler.draft_distribution(logits[b], [1, 2], 0)
        assert q.shape == (V,) and torch.allclose(q, sampler.draft_distribution(dense[b], [1, 2], 0), atol=1e-12)
        assert q[1::2].eq(0).all() and (q > 0).sum() <= 5
    penalised = Sampler(SamplingConfig(temperature=0.7, top_k=5, logits_processor=[
        RepetitionPenaltyLogitsProcessor(1.3)]), "cpu")
    assert torch.equal(penalised.draft_distribution(logits[0], [2, 4], 0),
                       penalised.draft_distribution(dense[0], [2, 4], 0))
