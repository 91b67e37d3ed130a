"""block_linear: a decode block's bf16 linears give each row the bits it gets alone (kernel or one row at a
time), while a prompt's prefill stays one call, as plain decoding runs it."""
import pytest
import torch
import transformers as tf

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.ops.attention import prefill_block
from adadecode_fx.ops.linear import LINEAR, ROW_LINEAR, row_linear
from adadecode_fx.runtime.kv_state import KVState
from tests.conftest import hf_greedy, tiny_model


def test_row_linear_blocks_equal_rows_alone_and_prefill_is_one_call():
    torch.manual_seed(0)
    w = (torch.randn(896, 4864) * 0.02).bfloat16()  # Qwen2.5-0.5B's down projection: oneDNN blocks differ here
    for T in range(2, 10):
        x = torch.randn(1, T, 4864).bfloat16()
        rows = torch.cat([LINEAR(x[:, i:i + 1], w) for i in range(T)], dim=1)
        assert torch.equal(row_linear(x, w), rows)
        with prefill_block():
            assert torch.equal(row_linear(x, w), LINEAR(x, w))
    assert torch.equal(ROW_LINEAR(x, w), rows)  # the op is the same function


def _qwen_shaped(layers=2):
    """Qwen2.5-0.5B's layer shapes (hidden 896, MLP 4864), random weights, bf16."""
    cfg = tf.Qwen2Config(vocab_size=512, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # wider weights than the init's: oneDNN's block rounding shows up often then
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.normal_(0, 1)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    return model


@torch.no_grad()
def test_decode_block_rows_equal_rows_alone_in_bf16():
    model = _qwen_shaped()
    prog = AdaDecoder(model, ExitHeads.identity(model, [0]), AdaDecodeConfig(threshold=0.5)).program
    import re

    kernel, rows = map(int, re.match(r"(\d+) linears on the kernel, (\d+) one row", prog.gm.meta["block_linear"]).groups())
    assert kernel + rows == 2 * 7 + 1  # every linear of the two layers and the LM head has an exact block path
    P, T = 24, 9
    ids = torch.randint(0, 512, (P + T,), generator=torch.Generator().manual_seed(1)).tolist()
    outs = []
    for block in (True, False):
        state = KVState(prog.gm.meta["kv_shapes"], 64, torch.bfloat16, "cpu", 1)
        prog.hidden_states(ids[:P], set(), state)
        spans = [(P, P + T)] if block else [(P + j, P + j + 1) for j in range(T)]
        rows = []
        for a, b in spans:
            kv = state.views(b)
            top = prog.top_inputs(ids[a:b], a, kv)
            pro = prog.prologue(top)
            h = prog.embeddings(pro, b - a)
            for i in range(prog.num_layers):
                h = prog.layer(i, h, pro, top, kv)
            rows.append(prog.epilogue(h))
        outs.append(torch.cat(rows, dim=1))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_one_row_fallback_keeps_bf16_parity_with_many_exits(family, monkeypatch):
    import sys

    pass_module = sys.modules["adadecode_fx.passes.block_linear"]  # the package re-exports the pass's name
    monkeypatch.setattr(pass_module, "block_linear_kernel", lambda: (None, "off for this test"))
    model = tiny_model(family, dtype=torch.bfloat16)
    heads = ExitHeads.random(model, [0, 2], scale=3.0, seed=1)
    dec = AdaDecoder(model, heads, AdaDecodeConfig(threshold=1e-6, max_pending=4))
    assert "one row at a time" in dec.program.gm.meta["block_linear"]
    prompt = list(range(3, 20))
    out = dec.generate(prompt, max_new_tokens=30)
    assert out.new_tokens == hf_greedy(model, prompt, 30)
    assert out.stats.early_emitted > 5 and out.stats.rejected > 0


def test_a_build_with_exits_says_when_blocks_run_one_row_at_a_time(monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.modules["adadecode_fx.passes.block_linear"], "block_linear_kernel", lambda: (None, "off"))
    model = tiny_model("llama", dtype=torch.bfloat16)
    AdaDecoder(model, ExitHeads.identity(model, [1]), AdaDecodeConfig(threshold=0.9))
    assert "one row at a time" in capsys.readouterr().err
    AdaDecoder(model, None, AdaDecodeConfig())  # no exits: nothing to say
    assert "one row at a time" not in capsys.readouterr().err
