"""shared_kv: layers that attend over an earlier layer's K/V read that layer's buffers under their own name,
and decode equal to HF greedy with exits and rollbacks on every backend that keeps K/V per layer."""
import pytest
import torch

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.capture import capture
from adadecode_fx.errors import UnsupportedModelError
from adadecode_fx.passes import PassSettings, shared_kv
from tests.conftest import assert_greedy_with_exits, captured, hf_greedy, random_decoder, tiny_model, FAMILIES

S = PassSettings()


def test_readers_get_their_producers_buffers_under_their_own_name():
    model = tiny_model("gemma4_shared")
    gm = capture(model)
    before = gm.graph.python_code("self").src
    out = shared_kv(gm, S)
    assert out is not gm and gm.graph.python_code("self").src == before  # a cached capture stays as it was
    # layer 3 (sliding) reads layer 2's buffers, layer 4 (full) layer 1's: the last writer of its kind
    assert out.meta["kv_sources"] == [0, 1, 2, 2, 1] and out.meta["num_layers"] == 5
    assert len(gm.meta["kv_shapes"]) == 3 and len(out.meta["kv_shapes"]) == 5
    names = {n.name for n in out.graph.nodes if n.op == "placeholder"}
    assert {"kv_3_0", "kv_3_1", "kv_4_0", "kv_4_1"} <= names
    assert shared_kv(captured("llama"), S) is captured("llama")  # nothing shared: untouched


@pytest.mark.parametrize("backend,dtype", [("eager", torch.float64), ("cudagraphs", torch.float64),
                                           ("inductor", torch.float32)])
def test_shared_layers_decode_hf_greedy_with_exits_at_writers_and_readers(backend, dtype):
    model = tiny_model("gemma4_shared", dtype=dtype)
    # layer 3 reads layer 2's K/V; inductor compiles per decoder, so it takes the first pair only
    for layers in ((1, 3), (2,))[:1 if backend == "inductor" else 2]:
        heads = ExitHeads.random(model, layers, scale=0.5, seed=1)
        dec = AdaDecoder(model, heads, AdaDecodeConfig(backend=backend, threshold=0.02, max_pending=3))
        assert dec.program.kv_sources == [0, 1, 2, 2, 1]
        assert_greedy_with_exits(dec, model, new=25)
    state = dec.program.kv_state(40, 1)
    assert state.buffers[3] is state.buffers[2] and state.buffers[4] is state.buffers[1]


def test_shared_layers_in_bf16_blocks_and_padded_batches_equal_each_prompt_alone():
    import transformers as tf

    config = FAMILIES["gemma4_shared"]()
    for k, v in dict(vocab_size=512, hidden_size=128, head_dim=32, global_head_dim=32,
                     vocab_size_per_layer_input=512).items():
        setattr(config, k, v)
    model = random_decoder(tf.Gemma4TextConfig(**config.to_dict()), torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (3, 25, 11)]
    alone = [hf_greedy(model, p, 30) for p in prompts]
    dec = AdaDecoder(model, ExitHeads.random(model, (1, 3), scale=0.5, seed=1),
                     AdaDecodeConfig(threshold=1e-9, max_pending=3))
    out = [dec.generate(p, 30, eos_token_id=None) for p in prompts]
    assert [o.new_tokens for o in out] == alone
    assert sum(o.stats.early_emitted for o in out) >= 20 and sum(o.stats.rejected for o in out) >= 5
    assert dec.generate(prompts, max_new_tokens=30, pad_token_id=0).new_tokens == alone


def test_the_onnx_export_refuses_shared_kv():
    pytest.importorskip("onnx")
    from adadecode_fx.lower.onnx_export import write_program

    model = tiny_model("gemma4_shared", dtype=torch.float32)
    dec = AdaDecoder(model, ExitHeads.random(model, (1,), seed=1), AdaDecodeConfig())
    with pytest.raises(UnsupportedModelError, match="share K/V across layers.*backend='eager'"):
        write_program(dec.program, "/nonexistent/never-written")
