"""row_exact_attention: a block of decode rows attends exactly as each row alone."""
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from adadecode_fx.passes import PassSettings, run_passes
from adadecode_fx.ops.attention import (
    ROW_EXACT,
    SDPA,
    plain_attention,
    prefill_block,
    row_exact,
    row_exact_sdpa,
)
from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from tests.conftest import assert_greedy_with_exits, captured, random_decoder


def _inputs(T=4, S=37, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 6, T, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 6, S, 16, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(2, 1, T, S, dtype=torch.bool).tril(S - T)
    mask[1, ..., :3] = False  # a left-padded row
    return q, k, v, mask


def test_rows_match_one_row_calls_over_their_own_keys():
    """Each query row of each batch row equals the call it gets when its prompt is decoded alone: keys
    from its first real slot (row 1 is left-padded by 3) up to its own position."""
    q, k, v, mask = _inputs()
    T, S = q.shape[2], k.shape[2]
    out = row_exact_sdpa(q, k, v, mask, scale=0.25)
    for b, pad in enumerate((0, 3)):
        for i in range(T):
            n = S - T + i + 1
            alone = SDPA(q[b:b + 1, :, i:i + 1], k[b:b + 1, :, pad:n], v[b:b + 1, :, pad:n],
                         mask[b:b + 1, :, i:i + 1, pad:n], scale=0.25)
            assert torch.equal(out[b:b + 1, :, i:i + 1], alone)
    # the masked pad keys are not just hidden but left out: reading them rounds differently in bf16
    hidden = SDPA(q[1:, :, -1:], k[1:], v[1:], mask[1:, :, -1:], scale=0.25)
    assert not torch.equal(out[1:, :, -1:], hidden)


def test_a_padded_prefill_reads_only_its_own_slots():
    """A left-padded row's prompt is prefilled in one call, over its real slots only, as alone."""
    q, k, v, _ = _inputs(T=20, S=25)
    mask = torch.ones(1, 1, 20, 25, dtype=torch.bool).tril(5)
    mask[..., :5] = False
    with prefill_block():
        out = row_exact_sdpa(q[:1], k[:1], v[:1], mask)
    assert not torch.equal(out, SDPA(q[:1], k[:1], v[:1], mask))  # the pads, if read, change the bits
    assert torch.equal(out, SDPA(q[:1], k[:1, :, 5:], v[:1, :, 5:], mask[..., 5:]))


def test_an_additive_float_mask_finds_the_same_first_keys():
    """Masks given as 0 / dtype-min biases (HF's float form) trim the same pad slots as boolean ones."""
    q, k, v, mask = _inputs()
    bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
    assert torch.equal(row_exact_sdpa(q, k, v, bias, scale=0.25), row_exact_sdpa(q, k, v, mask, scale=0.25))


def test_block_semantics_unchanged():
    q, k, v, mask = _inputs(dtype=torch.float64)
    torch.testing.assert_close(row_exact_sdpa(q, k, v, mask), SDPA(q, k, v, mask), rtol=1e-12, atol=1e-12)


def test_prefill_runs_one_block_call():
    q, k, v, mask = _inputs(T=9, S=9)
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    with prefill_block():
        out = row_exact_sdpa(q, k, v, mask)
    assert torch.equal(out, SDPA(q, k, v, mask))


def test_pass_rewrites_layer_attention_and_can_be_undone():
    gm = run_passes(captured("llama"), PassSettings())
    ops = [n for i in range(gm.meta["num_layers"]) for n in getattr(gm, f"layer_{i}").graph.nodes
           if n.op == "call_function"]
    assert sum(n.target is ROW_EXACT for n in ops) == gm.meta["num_layers"]
    assert not any(n.target is SDPA for n in ops)
    graph = plain_attention(gm.layer_0.graph)
    assert any(n.target is SDPA for n in graph.nodes)


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([2, 3, 7]), kv_heads=st.integers(1, 3), T=st.integers(1, 4), S=st.integers(4, 300),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), seed=st.integers(0, 10_000), pad=st.integers(0, 3))
def test_gqa_rows_equal_repeated_heads(groups, kv_heads, T, S, dtype, seed, pad):
    """K/V read per K/V head (`enable_gqa`, HF's own decode path) equals the repeated heads of the captured
    graph, bit for bit: what lets eager layers skip the repeat_kv copy (`lower.eager`). (Packing a row's
    query heads per K/V head, HF's `pack_gqa`, is 8x cheaper but NOT bit-equal: checked, not used.)"""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(2, kv_heads * groups, T, 64, generator=g) * 2).to(dtype)
    k, v = ((torch.randn(2, kv_heads, S, 64, generator=g) * 2).to(dtype) for _ in range(2))
    mask = torch.ones(2, 1, T, S, dtype=torch.bool).tril(S - T)
    mask[1, ..., :pad] = False
    repeated = row_exact(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), mask, scale=0.125)
    assert torch.equal(row_exact(q, k, v, mask, scale=0.125, enable_gqa=True), repeated)
    with prefill_block():
        repeated = row_exact(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), mask, scale=0.125)
        assert torch.equal(row_exact(q, k, v, mask, scale=0.125, enable_gqa=True), repeated)


def test_views_of_the_attention_output_become_reshapes():
    """AFMoE writes ``out.transpose(1, 2).contiguous().view(...)``; SDPA's CPU kernel returns a transposed
    buffer, so the capture kept transpose -> view without the copy, and that view fails on the row-exact
    op's contiguous blocks. Those views become reshapes, and blocks decode."""
    config = tf.AfmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                            num_hidden_layers=4, num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                            global_attn_every_n_layers=2, sliding_window=6, max_position_embeddings=256)
    model = random_decoder(config, torch.float32)  # its experts take no float64
    dec = AdaDecoder(model, ExitHeads.random(model, (0, 2), scale=0.5, seed=1),
                     AdaDecodeConfig(threshold=0.02, max_pending=3))
    assert_greedy_with_exits(dec, model)



def test_rows_of_a_local_layer_attend_over_its_last_window_keys():
    """HF's sliding-window cache hands a one-row step the last ``window`` keys; every row, alone or in a
    block, attends over exactly those (the whole K/V under the window's mask rounds differently in bf16)."""
    q, k, v, mask = _inputs()
    T, S, w = q.shape[2], k.shape[2], 6
    out = row_exact_sdpa(q, k, v, mask, scale=0.25, window=w)
    for i in range(T):
        n = S - T + i + 1
        alone = SDPA(q[:, :, i:i + 1], k[:, :, n - w:n], v[:, :, n - w:n], mask[..., i:i + 1, n - w:n], scale=0.25)
        assert torch.equal(out[:, :, i:i + 1], alone)
    short = row_exact(q[:, :, :1], k[:, :, :4], v[:, :, :4], mask[..., :1, :4], scale=0.25, window=w)
    assert torch.equal(short, SDPA(q[:, :, :1], k[:, :, :4], v[:, :, :4], mask[..., :1, :4], scale=0.25))


def test_a_chunked_layers_row_reads_hfs_last_chunk_keys_not_from_its_chunk_start():
    """An attention chunk (window -C): HF's cache hands a one-row step the last C keys, and the mask
    hides those before the row's chunk. The mask's first visible key is the chunk start there, not a
    pad, so the row must not be cut to it (that rounds differently: seed 2 below)."""
    g = torch.Generator().manual_seed(2)
    S, C, start = 100, 37, 74  # position 99's chunk of 37 starts at 74
    q = torch.randn(1, 6, 1, 16, generator=g).bfloat16()
    k, v = (torch.randn(1, 6, S, 16, generator=g).bfloat16() for _ in range(2))
    mask = torch.zeros(1, 1, 1, S, dtype=torch.bool)
    mask[..., start:] = True
    hf = SDPA(q, k[:, :, S - C:], v[:, :, S - C:], mask[..., S - C:])
    assert torch.equal(row_exact(q, k, v, mask, window=-C), hf)
    assert not torch.equal(hf, SDPA(q, k[:, :, start:], v[:, :, start:], mask[..., start:]))


def test_a_traced_one_row_step_slices_the_window_by_each_calls_length():
    """Scripted decode rows trace a layer at one K/V length and run it at every other one."""
    q, k, v, mask = _inputs(T=1, S=37)
    step = torch.jit.trace(lambda q, k, v, m: row_exact(q, k, v, m, scale=0.25, window=6) * 1,
                           (q, k[:, :, :20], v[:, :, :20], mask[..., :20]), check_trace=False)
    for n in (3, 20, 37):
        want = SDPA(q, k[:, :, max(0, n - 6):n], v[:, :, max(0, n - 6):n], mask[..., max(0, n - 6):n], scale=0.25)
        assert torch.equal(step(q, k[:, :, :n], v[:, :, :n], mask[..., :n]), want)


def test_window_goes_to_local_layers_only_and_plain_attention_drops_it():
    gm = captured("llama")
    n = gm.meta["num_layers"]
    windows = tuple(7 if i % 2 else 0 for i in range(n))
    gm = run_passes(gm, PassSettings(attention_windows=windows))
    for i in range(n):
        calls = [node for node in getattr(gm, f"layer_{i}").graph.nodes if node.target is ROW_EXACT]
        assert [c.kwargs.get("window", 0) for c in calls] == [windows[i]]
    graph = plain_attention(gm.layer_1.graph)
    assert all("window" not in node.kwargs for node in graph.nodes if node.target is SDPA)
