"""HF's top-p and torch's one-sample multinomial, computed faster: the same tensor, the same token, the same
generator state as the originals, on logits shaped like a real vocabulary's (bf16 values, so ties are
common) and on distributions sparse and dense."""
import math

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from adadecode_fx.runtime import hf_equivalents
from adadecode_fx.runtime.hf_equivalents import multinomial_one, top_p_filter

V = 151_936  # Qwen2.5's vocabulary
IDS = torch.zeros(1, 3, dtype=torch.long)


class CountingTopP(TopPLogitsWarper):
    calls = 0

    def __call__(self, input_ids, scores):
        CountingTopP.calls += 1
        return super().__call__(input_ids, scores)


def _logits(seed: int, scale: float, size: int = V, dtype=torch.float32) -> torch.Tensor:
    """A language model's shape of logits: a few tokens well above a noisy floor, rounded to bf16."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, size, generator=g) * scale
    logits[0, torch.randperm(size, generator=g)[:10]] += 4 + 8 * torch.rand(10, generator=g)
    return logits.bfloat16().to(dtype)


# (top_k, top_p, temperature, min_tokens_to_keep, whether the cut falls among the few high tokens, which
# rarely tie; further down the noisy floor, ties at the cut are common and HF's warper runs)
CUTS = [(20, 0.8, 0.7, 1, True), (5, 0.5, 0.3, 1, True), (40, 0.8, 0.7, 3, True), (50, 0.95, 1.0, 1, False),
        (1000, 0.9, 1.0, 1, False)]


@pytest.mark.parametrize("top_k, top_p, temperature, keep, high_cut", CUTS)
def test_top_p_after_top_k_is_hfs_tensor(top_k, top_p, temperature, keep, high_cut):
    CountingTopP.calls = 0
    n = 24
    for seed in range(n):
        scores = TemperatureLogitsWarper(temperature)(IDS, _logits(seed, 1 + seed % 3))
        scores = TopKLogitsWarper(top_k)(IDS, scores)
        warper = CountingTopP(top_p, min_tokens_to_keep=keep)
        ours = top_p_filter(warper, IDS, scores)
        theirs = TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(IDS, scores)
        assert torch.equal(ours, theirs), seed
    # HF's warper runs only where tied tokens lie on both sides of the cut; on Qwen2.5-Coder's own logits
    # that was 0 of 192 tokens at top-k 20 / top-p 0.8 and 8 of 192 at top-k 50 / top-p 0.95
    assert CountingTopP.calls < (n // 4 if high_cut else n)


def test_a_tie_across_the_cut_runs_hfs_warper():
    # four tokens of equal score hold 0.8 of the mass; top-p 0.5 keeps some of them, which HF's sort decides
    scores = torch.full((1, V), -math.inf)
    scores[0, [7, 70, 700, 7000]] = 2.0
    scores[0, [1, 2]] = 0.0
    CountingTopP.calls = 0
    ours = top_p_filter(CountingTopP(0.5), IDS, scores)
    assert CountingTopP.calls == 1 and torch.equal(ours, TopPLogitsWarper(0.5)(IDS, scores))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_p_over_a_small_vocabulary_without_inf_is_hfs_tensor(dtype):
    for seed in range(20):
        scores = _logits(seed, 3.0, size=512, dtype=dtype)
        assert torch.equal(top_p_filter(TopPLogitsWarper(0.9), IDS, scores), TopPLogitsWarper(0.9)(IDS, scores))


def test_top_p_with_another_filter_value_or_many_candidates_is_hfs_own():
    scores = _logits(0, 2.0)
    CountingTopP.calls = 0
    top_p_filter(CountingTopP(0.9), IDS, scores)  # every token a candidate: the sort is the cheap way
    top_p_filter(CountingTopP(0.9, filter_value=-1e4), IDS, TopKLogitsWarper(20)(IDS, scores))
    assert CountingTopP.calls == 2


def _distribution(seed: int, dtype, support: int | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    probs = torch.zeros(V, dtype=torch.float64)
    idx = torch.randperm(V, generator=g)[:support] if support else torch.arange(V)
    probs[idx] = torch.rand(idx.numel(), generator=g, dtype=torch.float64) ** 3
    return (probs / probs.sum()).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("support", [1, 2, 20, 300, None])
def test_multinomial_one_draws_torchs_token_and_leaves_its_generator_as_torch(dtype, support):
    assert hf_equivalents._same_as_multinomial()
    seen = set()
    for seed in range(6):
        probs = _distribution(seed, dtype, support)
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        drawn = [multinomial_one(probs, ours) for _ in range(4)]
        assert drawn == [int(torch.multinomial(probs, 1, generator=theirs)) for _ in range(4)]
        assert torch.equal(ours.get_state(), theirs.get_state())
        seen.update(drawn)
    assert len(seen) > 1 if support != 1 else len(seen) == 6  # draws, not one token over and over


def test_multinomial_one_with_torchs_global_generator():
    probs = _distribution(3, torch.float32, 50)
    torch.manual_seed(11)
    ours = [multinomial_one(probs) for _ in range(5)] + [float(torch.rand(()))]
    torch.manual_seed(11)
    assert ours == [int(torch.multinomial(probs, 1)) for _ in range(5)] + [float(torch.rand(()))]


def test_another_default_device_changes_nothing():
    """A user's ``torch.set_default_device`` (here the meta device) must not move the uniforms off the CPU."""
    probs = _distribution(2, torch.float32, 30)
    hf_equivalents._same_as_multinomial.cache_clear()
    try:
        with torch.device("meta"):
            assert hf_equivalents._same_as_multinomial()
            g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
            assert multinomial_one(probs, g1) == int(torch.multinomial(probs, 1, generator=g2))
    finally:
        hf_equivalents._same_as_multinomial.cache_clear()


def test_a_zero_variate_picks_what_torch_picks():
    # u = 0 gives E = 0: torch divides 0 by 0 where p is 0 and its argmax takes that NaN
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5])
    u = torch.tensor([0.3, 0.2, 0.0, 0.7], dtype=torch.float64)
    assert hf_equivalents._argmax_draw(probs, u) == int(torch.argmax(probs / (-torch.log1p(-u)).float())) == 2


def test_invalid_probabilities_are_refused_as_torch_refuses_them():
    for bad in (torch.zeros(10), torch.tensor([0.5, -0.1, 0.6]), torch.tensor([0.5, math.nan, 0.5])):
        with pytest.raises(RuntimeError):
            multinomial_one(bad)


def test_a_torch_that_samples_otherwise_gets_its_own_multinomial(monkeypatch):
    hf_equivalents._same_as_multinomial.cache_clear()
    monkeypatch.setattr(hf_equivalents, "_argmax_draw", lambda probs, u: 0)
    try:
        assert not hf_equivalents._same_as_multinomial()
        probs = _distribution(1, torch.float32, 20)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert multinomial_one(probs, g1) == int(torch.multinomial(probs, 1, generator=g2)) != 0
    finally:
        hf_equivalents._same_as_multinomial.cache_clear()
