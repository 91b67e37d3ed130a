"""``model.generate(..., custom_generate=adadecode_fx.generate)``: HF's interface, our loop. Streamers
see verified tokens only; stopping criteria and EOS cut where HF greedy cuts."""
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import adadecode_fx
from adadecode_fx import AdaDecodeError, ExitHeads

from tests.conftest import tiny_model

PROMPT = torch.tensor([[11, 12, 13, 14, 15]])


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", dtype=torch.float32)
    return model, ExitHeads.random(model, (1, 2, 3), seed=3)


def _hf(model, **kw):
    return model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False, pad_token_id=0, **kw)


def _ours(model, heads, **kw):
    return model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False, pad_token_id=0,
                          custom_generate=adadecode_fx.generate, exit_heads=heads,
                          adadecode={"threshold": 0.02, "max_pending": 3}, **kw)


class Recorder(BaseStreamer):
    def __init__(self):
        self.chunks = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_custom_generate_matches_hf_greedy_and_streams_only_verified_tokens(setup):
    model, heads = setup
    ref = _hf(model, max_new_tokens=40)
    streamer = Recorder()
    out = _ours(model, heads, max_new_tokens=40, stream=streamer)  # HF drops `streamer=` for callables
    assert out.tolist() == ref.tolist()
    stats_decoder = adadecode_fx.decoder_for(model, {"threshold": 0.02, "max_pending": 3}, heads)
    assert stats_decoder.config.exit_layers == (1, 2, 3)
    # first put is the prompt (as HF's streamers expect), then verified tokens in order: a rolled-back early
    # token in the stream would break this equality
    assert streamer.chunks[0] == PROMPT[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, PROMPT.shape[1]:].tolist()
    assert streamer.ended


def test_hfs_own_streamer_argument_streams_and_ends(setup):
    """HF does not pass ``streamer=`` on to a callable custom_generate but puts the prompt into it first:
    the streamer must still get the verified tokens and ``end()`` (a TextIteratorStreamer would hang)."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    model, heads = setup
    streamer = Recorder()
    out = _ours(model, heads, max_new_tokens=30, streamer=streamer)
    assert out.tolist() == _hf(model, max_new_tokens=30).tolist()
    assert streamer.chunks[0] == PROMPT[0].tolist()  # put by HF, once
    assert sum(streamer.chunks[1:], []) == out[0, PROMPT.shape[1]:].tolist() and streamer.ended

    batch = torch.cat([PROMPT, PROMPT + 1])
    with pytest.raises(AdaDecodeError, match="a streamer takes one sequence"):  # HF's own put took the batch
        model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=4, do_sample=False,
                       pad_token_id=0, custom_generate=adadecode_fx.generate, exit_heads=heads, streamer=Recorder())

    class Ids:  # a tokenizer for the iterator streamer: every id is its own word
        def decode(self, ids, **kw):
            return "".join(f" {i}" for i in ids)
    reader = TextIteratorStreamer(Ids(), skip_prompt=True, timeout=60)
    Thread(target=_ours, args=(model, heads), kwargs=dict(max_new_tokens=12, streamer=reader)).start()
    text = "".join(reader)  # ends only when end() comes
    assert text.split() == [str(t) for t in _hf(model, max_new_tokens=12)[0, PROMPT.shape[1]:].tolist()]


def test_streamed_chunks_are_never_taken_back(setup):
    model, heads = setup
    decoder = adadecode_fx.decoder_for(model, {"threshold": 0.02, "max_pending": 3}, heads)
    streamer = Recorder()
    result = decoder.generate(PROMPT, max_new_tokens=40, eos_token_id=None, streamer=streamer)
    assert result.stats.rejected > 0  # rollbacks happened while streaming
    assert sum(streamer.chunks, []) == result.new_tokens


class StopAfter(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_stopping_criteria_and_eos_cut_where_hf_cuts(setup):
    model, heads = setup
    full = _hf(model, max_new_tokens=40)[0, PROMPT.shape[1]:].tolist()
    stop_token = full[17]
    crit = StoppingCriteriaList([StopAfter(stop_token)])
    assert _ours(model, heads, max_new_tokens=40, stopping_criteria=crit).tolist() == \
        _hf(model, max_new_tokens=40, stopping_criteria=StoppingCriteriaList([StopAfter(stop_token)])).tolist()
    eos = full[9]
    assert _ours(model, heads, max_new_tokens=40, eos_token_id=eos).tolist() == \
        _hf(model, max_new_tokens=40, eos_token_id=eos).tolist()
    # HF's default length and EOS criteria are the runtime's own checks: not asked per token
    from adadecode_fx.api import _beyond_the_runtime
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    prepared = StoppingCriteriaList([MaxLengthCriteria(45), EosTokenCriteria(7), crit[0], EosTokenCriteria([7, 9])])
    assert list(_beyond_the_runtime(prepared, 45, [7])) == [crit[0], prepared[3]]
    assert len(_beyond_the_runtime(prepared, 46, 7)) == 3  # a criterion that stops sooner stays
    # called directly too: the criteria are honoured, not dropped
    direct = adadecode_fx.generate(model, PROMPT, max_new_tokens=40, eos_token_id=None, stopping_criteria=crit,
                                   exit_heads=heads, adadecode={"threshold": 0.02, "max_pending": 3})
    assert direct.tolist() == _hf(model, max_new_tokens=40, stopping_criteria=crit).tolist()
    with pytest.raises(AdaDecodeError, match="pass tokenizer="):
        adadecode_fx.generate(model, PROMPT, max_new_tokens=4, stop_strings=["w1"], exit_heads=heads)


class _Stateful(LogitsProcessor):
    """A processor AdaDecode sampling does not know to be stateless."""

    def __call__(self, input_ids, scores):
        return scores


@pytest.mark.parametrize("kw,match", [
    ({"do_sample": True, "logits_processor": LogitsProcessorList([_Stateful()])}, "not supported with AdaDecode sampling"),
    ({"logits_processor": LogitsProcessorList([_Stateful()])}, "not supported with AdaDecode greedy decoding"),
    ({"num_beams": 2}, "beam search"),
    ({"guidance_scale": 1.5}, "drop guidance_scale"),
    ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive search mode is not supported"),
    ({"dola_layers": "low"}, "dola generation mode is not supported"),
    ({"prompt_lookup_num_tokens": 3}, "two ways to speed up the same decoding"),
    ({"return_dict_in_generate": True, "output_hidden_states": True}, "output_hidden_states are not available"),
])
def test_unsupported_generation_settings_are_refused(setup, kw, match):
    model, heads = setup
    args = dict(max_new_tokens=5, custom_generate=adadecode_fx.generate, exit_heads=heads, pad_token_id=0)
    args.setdefault("do_sample", False)
    args.update(kw)
    with pytest.raises(AdaDecodeError, match=match):
        model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), **args)


def test_an_assistant_model_is_refused_not_dropped(setup):
    # HF does not pass assistant_model on to a callable custom_generate: it is read from HF's call
    model, heads = setup
    with pytest.raises(AdaDecodeError, match="two ways to speed up the same decoding"):
        model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=5, do_sample=False,
                       pad_token_id=0, custom_generate=adadecode_fx.generate, exit_heads=heads,
                       assistant_model=model)


@pytest.mark.parametrize("kw", [{}, {"repetition_penalty": 1.4}])
def test_scores_and_logits_through_hf_equal_hf_greedys(kw):
    """float64, where deferred blocks compute what one row does bit for bit (float32 blocks round their
    matmuls differently in the last bits: the tokens agree, the logits within ~1e-6)."""
    model = tiny_model("llama")
    heads = ExitHeads.random(model, (1, 3), seed=0)
    asked = dict(max_new_tokens=30, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    ref = _hf(model, **asked)
    for backend in ("eager", "cudagraphs"):
        out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False, pad_token_id=0,
                             custom_generate=adadecode_fx.generate, exit_heads=heads,
                             adadecode={"threshold": 0.02, "backend": backend}, **asked)
        assert torch.equal(out.sequences, ref.sequences)
        for mine, theirs in ((out.scores, ref.scores), (out.logits, ref.logits)):
            assert len(mine) == len(theirs) == 30 and all(torch.equal(a, b) for a, b in zip(mine, theirs))
    decoder = adadecode_fx.decoder_for(model, {"threshold": 0.02}, heads)
    assert decoder.generate(PROMPT[0].tolist(), 30).stats.rejected >= 3  # the exits were often wrong
    with pytest.raises(AdaDecodeError, match="takes one sequence"):
        model.generate(torch.cat([PROMPT, PROMPT]), attention_mask=torch.ones(2, 5, dtype=torch.long),
                       do_sample=False, pad_token_id=0, custom_generate=adadecode_fx.generate, exit_heads=heads,
                       **asked)


def test_sampled_tokens_come_with_the_logits_that_drew_them():
    """Sampling with exits and resamples: each returned logits row is the final layer's at that token's
    slot (a forward pass over the returned sequence gives the same), and the scores are HF's processors
    (here top-k 4) over it."""
    model = tiny_model("llama")
    heads = ExitHeads.random(model, (1, 3), seed=0)
    out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=True, top_k=4, max_new_tokens=30,
                         pad_token_id=0, custom_generate=adadecode_fx.generate, exit_heads=heads, seed=0,
                         adadecode={"threshold": 0.02}, return_dict_in_generate=True, output_scores=True,
                         output_logits=True)
    P = PROMPT.shape[1]
    with torch.no_grad():
        full = model(out.sequences).logits[0, P - 1:-1].float()
    assert len(out.logits) == len(out.scores) == 30
    for i, (logits, scores) in enumerate(zip(out.logits, out.scores)):
        torch.testing.assert_close(logits[0], full[i], rtol=1e-6, atol=1e-6)
        kept = torch.isfinite(scores[0])
        assert int(kept.sum()) == 4 and bool(kept[out.sequences[0, P + i]])  # the token drawn was allowed


def test_left_padded_batch_through_hf_equals_hf_batched_greedy(setup):
    model, heads = setup
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    args = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    ours = model.generate(ids, custom_generate=adadecode_fx.generate, exit_heads=heads,
                          adadecode={"threshold": 0.05}, **args)
    assert torch.equal(ours, model.generate(ids, do_sample=False, **args))


def test_a_misspelt_setting_names_the_right_one(setup):
    model, heads = setup
    with pytest.raises(AdaDecodeError, match="unknown adadecode setting.*'thresh' \\(did you mean 'threshold'\\?\\)"):
        adadecode_fx.generate(model, PROMPT, max_new_tokens=2, exit_heads=heads, adadecode={"thresh": 0.5})
    with pytest.raises(AdaDecodeError, match="'max_pendin' \\(did you mean 'max_pending'\\?\\)"):
        model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=2, do_sample=False,
                       pad_token_id=0, custom_generate=adadecode_fx.generate, exit_heads=heads,
                       adadecode={"max_pendin": 2})


def test_inputs_embeds_are_refused_with_a_way_out(setup):
    model, heads = setup
    with pytest.raises(AdaDecodeError, match="inputs_embeds are not supported.*pass input_ids"):
        model.generate(inputs_embeds=model.get_input_embeddings()(PROMPT), max_new_tokens=5, pad_token_id=0,
                       custom_generate=adadecode_fx.generate, exit_heads=heads)


def test_right_padding_is_refused_with_a_way_out(setup):
    model, heads = setup
    ids = torch.tensor([[5, 6, 0], [7, 8, 9]])
    with pytest.raises(AdaDecodeError, match="padding_side = 'left'"):
        adadecode_fx.generate(model, ids, attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), exit_heads=heads)




def test_too_many_new_tokens_are_refused_before_allocating(setup):
    model, heads = setup  # max_position_embeddings = 256
    with pytest.raises(AdaDecodeError, match=r"more than this model's 256 \(max_position_embeddings\)"):
        adadecode_fx.generate(model, PROMPT, max_new_tokens=10 ** 9, exit_heads=heads, adadecode={"threshold": 0.02})
    with pytest.raises(AdaDecodeError, match="lower max_new_tokens to at most 251"):
        _ours(model, heads, max_new_tokens=300)
