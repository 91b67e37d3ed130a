"""Parity on a real pretrained model: SmolLM2-135M (fp32) on real prompts, token for token vs HF greedy.

Untrained heads at a low threshold make the runtime exit early on most tokens and reject most of them,
so rollback, deferred batching and verification are all exercised on real activations.
"""
import pytest
import torch

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.zoo.data import load_prompts

NEW_TOKENS = 64


def _prompts(tokenizer):
    records = load_prompts("humaneval", n=5) + load_prompts("gsm8k", n=5)
    return [(r["id"], tokenizer(r["prompt"][-600:]).input_ids) for r in records]


@pytest.mark.slow
def test_smollm2_parity_with_many_exits_and_rejections(smol):
    model, tokenizer = smol
    L = model.config.num_hidden_layers
    heads = ExitHeads.random(model, [4, 12, 20], scale=0.5, seed=1)
    decoder = AdaDecoder(model, heads, AdaDecodeConfig(threshold=0.02, max_pending=4))
    totals = {"early": 0, "rejected": 0, "accepted": 0}
    for rid, ids in _prompts(tokenizer):
        x = torch.tensor([ids])
        ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=NEW_TOKENS)[0, len(ids):].tolist()
        out = decoder.generate(ids, max_new_tokens=NEW_TOKENS)
        assert out.new_tokens == ref, f"{rid}: first difference at {next(i for i, (a, b) in enumerate(zip(out.new_tokens + [-1], ref + [-2])) if a != b)}"
        totals["early"] += out.stats.early_emitted
        totals["rejected"] += out.stats.rejected
        totals["accepted"] += out.stats.accepted
        assert all(0 <= l < L for l in out.stats.token_exit_layers)
    # the test only means something if the runtime really exited and really rolled back
    assert totals["early"] >= 100, totals
    assert totals["rejected"] >= 50, totals


@pytest.mark.slow
def test_smollm2_bf16_greedy_with_a_repetition_penalty_equals_hf():
    """Greedy after HF's processors on real bf16 weights (the shipped heads, through custom_generate),
    and the scores and logits HF returns."""
    import adadecode_fx
    from tests.conftest import smollm2

    model, tokenizer = smollm2("bfloat16")
    for _, ids in _prompts(tokenizer)[::5]:
        x = torch.tensor([ids])
        kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=48, repetition_penalty=1.2,
                  no_repeat_ngram_size=4, eos_token_id=[], pad_token_id=0)
        ref = model.generate(x, **kw)
        assert not torch.equal(ref, model.generate(x, attention_mask=kw["attention_mask"], do_sample=False,
                                                   max_new_tokens=48, eos_token_id=[], pad_token_id=0))
        assert torch.equal(model.generate(x, custom_generate=adadecode_fx.generate, **kw), ref)
    # bf16 blocks are computed as one row is: the scores and logits HF returns, bit for bit
    kw.update(return_dict_in_generate=True, output_scores=True, output_logits=True)
    ref, out = model.generate(x, **kw), model.generate(x, custom_generate=adadecode_fx.generate, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores + out.logits, ref.scores + ref.logits))
    assert adadecode_fx.decoder_for(model).config.exit_layers  # the shipped heads took part


@pytest.mark.slow
def test_smollm2_bf16_batch_rows_equal_their_prompts_alone():
    """A padded bf16 batch on real weights: every row equals its prompt decoded alone by HF, at full depth
    and with the shipped heads. HF's own batch parts from alone here (one linear call over B rows rounds
    a row by B, and a padded row reads its masked pad keys), so the comparison can fail."""
    from adadecode_fx.api import decoder_for
    from tests.conftest import smollm2

    model, tokenizer = smollm2("bfloat16")
    tokenizer.padding_side = "left"
    texts = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n# load a csv file and"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    kw = dict(do_sample=False, max_new_tokens=40, eos_token_id=[], pad_token_id=0)
    rows = [enc.input_ids[b][enc.attention_mask[b].bool()][None] for b in range(len(texts))]
    alone = [model.generate(r, attention_mask=torch.ones_like(r), **kw)[0, r.shape[1]:].tolist() for r in rows]
    hf_batch = model.generate(**enc, **kw)[:, enc.input_ids.shape[1]:].tolist()
    assert hf_batch != alone
    for decoder in (AdaDecoder(model), decoder_for(model)):
        out = decoder.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=40,
                               eos_token_id=None)
        assert out.new_tokens == alone


@pytest.mark.slow
def test_stop_strings_as_a_stopping_criterion_cut_where_hfs_stop_strings_cut(smol):
    """transformers 5.24 drops ``tokenizer=`` before it calls a callable ``custom_generate``, so
    ``stop_strings=`` fails in HF's own generate; the README's way out, HF's ``StopStringCriteria`` as a
    stopping criterion, must cut where HF's ``stop_strings`` cut, with exits and rollbacks on the way."""
    import adadecode_fx
    from transformers import StoppingCriteriaList, StopStringCriteria

    model, tokenizer = smol
    x = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=48, pad_token_id=0)
    full = model.generate(x, **kw)[0, x.shape[1]:].tolist()
    stop = tokenizer.decode(full[20:22]).strip()[:5]  # text the continuation reaches near token 20
    assert stop
    ref = model.generate(x, stop_strings=[stop], tokenizer=tokenizer, **kw)
    assert ref.shape[1] - x.shape[1] < len(full)
    heads = ExitHeads.random(model, [4, 12, 20], scale=0.5, seed=1)
    out = model.generate(x, custom_generate=adadecode_fx.generate, exit_heads=heads,
                         adadecode={"threshold": 0.02, "max_pending": 4},
                         stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, [stop])]), **kw)
    assert torch.equal(out, ref)
