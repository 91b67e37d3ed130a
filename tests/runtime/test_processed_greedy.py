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
    assert batch.new_tokens == [_hf(model, p, 20) for p in PROMPTS]  # each row as if decoded alone


def test_stateful_processors_are_refused():
    class Stateful(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    dec = AdaDecoder(tiny_model("llama"), None, AdaDecodeConfig())
    with pytest.raises(AdaDecodeError, match="not supported with AdaDecode greedy decoding"):
        dec.generate([5, 6, 7], 4, logits_processor=LogitsProcessorList([Stateful()]))
