"""Greedy decoding after HF logits processors: HF greedy search's tokens, with many exits and rollbacks."""
from __future__ import annotations

import pytest
import torch
from transformers import (LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor,
                          RepetitionPenaltyLogitsProcessor)

import adadecode_fx
from adadecode_fx import AdaDecodeConfig, AdaDecodeError, AdaDecoder, ExitHeads

from tests.conftest import hf_greedy, tiny_model

PROMPTS = ([5, 6, 7], [9, 10, 9, 10, 9], list(range(20, 45)))
SETTINGS = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 3}


def _processors():
    return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5), NoRepeatNGramLogitsProcessor(3)])


def _hf(model, prompt, new):
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                          pad_token_id=0, **SETTINGS)[0, len(prompt):].tolist()


@pytest.mark.parametrize("family,backend", [("llama", "eager"), ("qwen2", "cudagraphs"), ("gemma2", "eager")])
def test_equals_hf_greedy_with_the_same_processors(family, backend):
    model = tiny_model(family)
    heads = ExitHeads.random(model, [1, 3], scale=1.0, seed=0)
    dec = AdaDecoder(model, heads, AdaDecodeConfig(threshold=0.02, max_pending=4, backend=backend))
    early = rejected = changed = 0
    for prompt in PROMPTS:
        out = dec.generate(prompt, 30, eos_token_id=None, logits_processor=_processors())
        assert out.new_tokens == _hf(model, prompt, 30)
        changed += out.new_tokens != hf_greedy(model, prompt, 30)  # the processors are really applied
        early, rejected = early + out.stats.early_emitted, rejected + out.stats.rejected
    assert changed >= 2 and early >= 30 and rejected >= 5


def test_through_custom_generate_and_for_a_batch():
    model = tiny_model("llama")
    heads = ExitHeads.random(model, [1, 3], scale=1.0, seed=1)
    ids = torch.tensor([PROMPTS[1]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                         pad_token_id=0, **SETTINGS)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20, pad_token_id=0,
                         custom_generate=adadecode_fx.generate, exit_heads=heads, adadecode={"threshold": 0.02},
                         **SETTINGS)
    assert torch.equal(out, ref)
    dec = adadecode_fx.decoder_for(model, {"threshold": 0.02}, heads)
    batch = dec.generate(list(PROMPTS), 20, eos_token_id=None, logits_processor=_processors())
    ids, mask = _left_padded(list(PROMPTS), pad_id=0)  # token lists are padded with id 0
    hf_batch = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0,
                              logits_processor=_processors())
    assert batch.new_tokens == hf_batch[:, ids.shape[1]:].tolist()  # HF's loop on the same padded rows


def _left_padded(prompts, pad_id):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("do_sample", [False, True])
def test_a_padded_batch_through_custom_generate_equals_hf_on_the_same_batch(monkeypatch, do_sample):
    """HF builds its processors for the padded batch: the repetition penalty keeps each row's padding
    length to skip, and min length, forced EOS and the length penalty count the padding. Each row must
    equal HF's on the same padded batch (top_k=1 makes sampling deterministic: the same check). Before,
    the repetition penalty raised and forced EOS never came in padded rows."""
    model = tiny_model("llama")
    heads = ExitHeads.random(model, [1, 3], scale=1.0, seed=2)
    ids, mask = _left_padded([[5, 6, 7], list(range(20, 33)), [9, 10, 9, 10, 9]], pad_id=3)
    kw = dict(attention_mask=mask, max_new_tokens=20, pad_token_id=3, eos_token_id=4, do_sample=do_sample)
    if do_sample:
        kw["top_k"] = 1
    settings = dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=3, forced_eos_token_id=4,
                    exponential_decay_length_penalty=(4, 1.3))
    ref = model.generate(ids, **kw, **settings)
    assert not torch.equal(ref, model.generate(ids, **kw))  # the processors matter here
    assert (ref[:, ids.shape[1]:] == 4).any(1).all()  # every row ends where the length processors end it
    dec = adadecode_fx.decoder_for(model, {"threshold": 0.02, "max_pending": 3}, heads)
    results = []
    plain_generate = dec.generate
    monkeypatch.setattr(dec, "generate", lambda *a, **k: results.append(plain_generate(*a, **k)) or results[-1])
    out = model.generate(ids, **kw, **settings, custom_generate=adadecode_fx.generate, exit_heads=heads,
                         adadecode={"threshold": 0.02, "max_pending": 3})
    assert torch.equal(out, ref)
    stats = results[-1].stats
    assert stats.early_emitted >= 10 and stats.rejected >= 3, stats


def _allowed(batch_id, ids):
    """A pure constraint that depends on the row's batch index and its last token."""
    return [t for t in range(128) if (t + int(ids[-1]) + batch_id) % 3]


@pytest.mark.parametrize("do_sample", [False, True])
def test_prefix_allowed_tokens_get_each_rows_batch_index(monkeypatch, do_sample):
    model = tiny_model("llama")
    heads = ExitHeads.random(model, [1, 3], scale=1.0, seed=3)
    ids, mask = _left_padded([[5, 6, 7], list(range(20, 33))], pad_id=0)
    kw = dict(attention_mask=mask, max_new_tokens=20, pad_token_id=0, do_sample=do_sample)
    if do_sample:
        kw["top_k"] = 1
    ref = model.generate(ids, **kw, prefix_allowed_tokens_fn=_allowed)
    assert not torch.equal(ref, model.generate(ids, **kw))  # the constraint matters here
    # the second row's tokens obey the constraint of batch index 1, which index 0 would not
    assert all((t + int(prev) + 1) % 3 for prev, t in zip(ref[1, 12:-1], ref[1, 13:]))
    dec = adadecode_fx.decoder_for(model, {"threshold": 0.02, "max_pending": 3}, heads)
    results = []
    plain_generate = dec.generate
    monkeypatch.setattr(dec, "generate", lambda *a, **k: results.append(plain_generate(*a, **k)) or results[-1])
    out = model.generate(ids, **kw, prefix_allowed_tokens_fn=_allowed, custom_generate=adadecode_fx.generate,
                         exit_heads=heads, adadecode={"threshold": 0.02, "max_pending": 3})
    assert torch.equal(out, ref)
    assert results[-1].stats.early_emitted >= 10 and results[-1].stats.rejected >= 3, results[-1].stats


@pytest.mark.parametrize("scheme,do_sample", [("lefthash", False), ("selfhash", False), ("lefthash", True)])
def test_watermarking_equals_hf_with_many_exits(monkeypatch, scheme, do_sample):
    """HF's watermark reseeds its generator from each position's prefix on every call, so it is a function
    of the prefix and verification applies it per position. Greedy, and sampling with top_k=1 (then
    deterministic), for one prompt and a padded batch, equal HF; the greedy watermark changes the tokens."""
    from transformers import WatermarkingConfig

    model = tiny_model("llama")
    monkeypatch.setattr(model.generation_config, "eos_token_id", None)
    heads = ExitHeads.random(model, [1, 3], scale=1.0, seed=4)
    config = {"threshold": 0.02, "max_pending": 4}
    ids, mask = _left_padded(list(PROMPTS), pad_id=0)
    kw = dict(attention_mask=mask, do_sample=do_sample, max_new_tokens=24, pad_token_id=0,
              watermarking_config=WatermarkingConfig(bias=2.5, seeding_scheme=scheme),
              **({"top_k": 1} if do_sample else {}))
    ours = dict(custom_generate=adadecode_fx.generate, exit_heads=heads, adadecode=config)
    assert torch.equal(model.generate(ids, **ours, **kw), model.generate(ids, **kw))
    one = ids[2:, -len(PROMPTS[2]):]
    kw["attention_mask"] = torch.ones_like(one)
    ref = model.generate(one, **kw)
    assert torch.equal(model.generate(one, **ours, **kw), ref)
    if not do_sample:  # HF adds the bias after top_k, so with top_k=1 the watermark cannot move a token
        assert ref[0, one.shape[1]:].tolist() != hf_greedy(model, PROMPTS[2], 24)
    dec = adadecode_fx.decoder_for(model, config, heads)
    stats = dec.generate(PROMPTS[2], 24, eos_token_id=None).stats
    assert stats.early_emitted >= 5 and stats.rejected >= 1


def test_pad_slots_keep_their_ids_for_the_processors():
    """An n-gram through a pad slot bans a token in HF; the row's pad ids must reach the processors."""
    from adadecode_fx.runtime.prompts import prompt_batch
    ids, mask = _left_padded([[5, 6], [7, 8, 9, 10]], pad_id=11)
    assert prompt_batch(ids, mask, vocab=128).rows[0] == [11, 11, 5, 6]
    assert prompt_batch(torch.tensor([[500, 5]]), torch.tensor([[0, 1]]), vocab=128).rows[0] == [0, 5]


def test_stateful_processors_are_refused():
    class Stateful(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    dec = AdaDecoder(tiny_model("llama"), None, AdaDecodeConfig())
    with pytest.raises(AdaDecodeError, match="not supported with AdaDecode greedy decoding"):
        dec.generate([5, 6, 7], 4, logits_processor=LogitsProcessorList([Stateful()]))
