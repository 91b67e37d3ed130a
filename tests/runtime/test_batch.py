"""Batches: left padding, lockstep steps, batch-wide rollback, per-row EOS. Every row's output equals that
row's plain greedy output, whatever the heads decide."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.errors import AdaDecodeError
from tests.conftest import decoder, hf_greedy, tiny_model

# gemma2: eager attention, where a fully masked (pad) query row gives NaN; gpt_neox: its own rotary layout
BATCH_FAMILIES = ["llama", "gemma2", "gpt_neox", "phi3"]


def random_prompts(model, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", BATCH_FAMILIES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_row_equals_its_own_greedy(family, data):
    model = tiny_model(family)
    n = model.config.num_hidden_layers
    lengths = data.draw(st.lists(st.integers(1, 24), min_size=2, max_size=5), label="prompt lengths")
    layers = sorted(data.draw(st.sets(st.integers(0, n - 2), min_size=1, max_size=2), label="exit layers"))
    new = data.draw(st.integers(1, 24), label="max_new_tokens")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    dec = decoder(model, layers, threshold=data.draw(st.sampled_from([1e-9, 0.05, 0.3]), label="gamma"),
                  max_pending=data.draw(st.integers(0, 5), label="max_pending"), seed=seed,
                  scale=data.draw(st.sampled_from([0.0, 3.0]), label="head noise"),
                  kv_bucket=data.draw(st.sampled_from([1, 16]), label="kv bucket"))
    prompts = random_prompts(model, lengths, seed)
    out = dec.generate(prompts, max_new_tokens=new, pad_token_id=0)
    assert out.new_tokens == [hf_greedy(model, p, new) for p in prompts]
    width = max(lengths)
    assert out.sequences.shape == (len(prompts), width + new)
    for row, p, gen in zip(out.sequences.tolist(), prompts, out.new_tokens):
        assert row == [0] * (width - len(p)) + p + gen
    assert out.stats.batch_size == len(prompts) and out.stats.new_tokens == len(prompts) * new


def scripted_rows(model, references, wrong):
    """Every probe is confident; row b's guess for a slot is the reference token unless ``wrong(b, slot)``."""
    vocab = model.config.vocab_size

    def probe(layer, hidden_last, rows):
        slot = len(rows[0])
        return [(ref[slot] + wrong(b, slot)) % vocab for b, ref in enumerate(references)], [1.0] * len(rows)

    return AdaDecoder(model, ExitHeads.identity(model, [1]), AdaDecodeConfig(threshold=0.5, max_pending=3), probe=probe)


def scripted_run(wrong, new=15):
    model = tiny_model("llama")
    prompts = [list(range(5, 15)), list(range(20, 24)), list(range(40, 47))]
    refs = [hf_greedy(model, p, new) for p in prompts]
    width = max(map(len, prompts))
    padded = [[0] * (width - len(p)) + p + r + [0] for p, r in zip(prompts, refs)]
    return scripted_rows(model, padded, wrong).generate(prompts, max_new_tokens=new), refs


def test_one_wrong_row_rolls_back_all_rows_and_loses_nothing():
    out, refs = scripted_run(lambda b, slot: b == 1)
    assert out.new_tokens == refs
    s = out.stats
    assert s.early_emitted > 0 and s.rejected > 0
    assert s.early_exit_rate == 0.0  # every early slot was taken back


def test_rows_wrong_at_different_slots_roll_back_to_the_earliest():
    """Row 0 errs on every third slot, row 2 on the slots after those: a block of pending early tokens
    holds errors of different rows at different slots, and only the earliest may stand as the cut."""
    out, refs = scripted_run(lambda b, slot: (b == 0 and slot % 3 == 0) or (b == 2 and slot % 3 == 1))
    assert out.new_tokens == refs
    s = out.stats
    assert s.accepted > 0 and s.rejected > 0 and 0 < s.early_exit_rate < 1


def test_rows_end_at_their_own_eos_and_are_padded():
    model = tiny_model("qwen2")
    prompts = [list(range(3, 15)), list(range(50, 55))]
    full = [hf_greedy(model, p, 30) for p in prompts]
    eos = full[0][5]
    expected = [r[:r.index(eos) + 1] if eos in r else r for r in full]
    assert len(expected[0]) == 6 and expected[0] != expected[1]
    dec = decoder(model, [0, 2], threshold=1e-9, max_pending=4, scale=3.0)
    out = dec.generate(prompts, max_new_tokens=30, eos_token_id=eos, pad_token_id=127)
    assert out.new_tokens == expected
    assert out.new_tokens == [hf_greedy(model, p, 30, eos_token_id=eos) for p in prompts]
    width = 12 + max(len(e) for e in expected)
    assert out.sequences.shape == (2, width)
    assert out.sequences[0, 12 + 6:].eq(127).all()


def test_stop_is_asked_per_row_with_that_rows_tokens():
    model = tiny_model("llama")
    prompts = [list(range(3, 15)), list(range(50, 55))]
    seen = []

    def stop(tokens):
        seen.append(tokens)
        return len(tokens) >= 8 and tokens[0] == 50  # ends row 1 only, after 3 new tokens
    dec = decoder(model, [1], threshold=0.05, scale=3.0)
    out = dec.generate(prompts, max_new_tokens=10, stop=stop)
    assert len(out.new_tokens[0]) == 10 and len(out.new_tokens[1]) == 3
    assert all(t[0] in (3, 50) for t in seen)  # never a pad slot


def test_tensor_batch_with_attention_mask_and_sampling_top_k_1():
    model = tiny_model("mistral")
    prompts = [[7, 8, 9, 10, 11], [12, 13]]
    ids = torch.tensor([prompts[0], [0, 0, 0] + prompts[1]])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    dec = decoder(model, [0, 2], threshold=0.05, scale=3.0)
    greedy = dec.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert greedy.new_tokens == [hf_greedy(model, p, 12) for p in prompts]
    sampled = dec.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=1, seed=3)
    assert sampled.new_tokens == greedy.new_tokens


def test_sampled_batches_repeat_with_a_seed():
    model = tiny_model("llama")
    dec = decoder(model, [1, 2], threshold=0.01, scale=0.5)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    a = dec.generate(prompts, max_new_tokens=16, do_sample=True, temperature=1.5, seed=11)
    b = dec.generate(prompts, max_new_tokens=16, do_sample=True, temperature=1.5, seed=11)
    c = dec.generate(prompts, max_new_tokens=16, do_sample=True, temperature=1.5, seed=12)
    assert a.new_tokens == b.new_tokens != c.new_tokens


@pytest.mark.parametrize("ids,mask,match", [
    (torch.tensor([[5, 6, 0], [7, 8, 9]]), torch.tensor([[1, 1, 0], [1, 1, 1]]), "not left-padded"),
    (torch.tensor([[5, 6, 7], [0, 0, 0]]), torch.tensor([[1, 1, 1], [0, 0, 0]]), "prompt 1 is empty"),
    (torch.tensor([[5, 6, 7], [7, 8, 9]]), torch.tensor([[1, 1, 1]]), "one mask entry per token"),
    ([[5, 6], []], None, "empty"),
    ([[5, 6], [7, 999]], None, "outside the vocabulary"),
])
def test_bad_batches_are_refused(ids, mask, match):
    dec = decoder(tiny_model("llama"), [1])
    with pytest.raises(AdaDecodeError, match=match):
        dec.generate(ids, attention_mask=mask, max_new_tokens=3)


def test_streaming_a_batch_is_refused():
    from transformers.generation.streamers import BaseStreamer

    dec = decoder(tiny_model("llama"), [1])
    with pytest.raises(AdaDecodeError, match="one sequence"):
        dec.generate([[5, 6], [7, 8]], max_new_tokens=3, streamer=BaseStreamer())
