"""Eager lowering: layers call the row-exact attention body directly, the shared segments keep the op."""
import torch

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.ops.attention import ROW_EXACT, SDPA, plain_attention, row_exact
from adadecode_fx.runtime import DecodeProgram

from tests.conftest import tiny_model


def _targets(graph) -> list:
    return [n.target for n in graph.nodes if n.op == "call_function"]


def test_eager_layers_skip_the_custom_op_and_leave_shared_segments_alone():
    model = tiny_model("qwen2", dtype=torch.float32)
    heads = ExitHeads.random(model, (1, 3), seed=0)
    dec = AdaDecoder(model, heads, AdaDecodeConfig(threshold=0.02, max_pending=3))
    for i, fn in enumerate(dec.program.layer_fns):
        assert row_exact in _targets(fn.graph) and ROW_EXACT not in _targets(fn.graph), i
        assert ROW_EXACT in _targets(getattr(dec.gm, f"layer_{i}").graph), i  # what other lowerings start from
    # an exporter that maps the op back to SDPA also maps the plain body back
    assert SDPA in _targets(plain_attention(dec.program.layer_fns[0].graph))


def test_eager_layers_read_kv_heads_unrepeated():
    model = tiny_model("qwen2", dtype=torch.float32)  # 4 query heads over 2 K/V heads
    dec = AdaDecoder(model, ExitHeads.random(model, (1,), seed=0), AdaDecodeConfig(threshold=0.02))
    for fn in dec.program.layer_fns:
        attn = next(n for n in fn.graph.nodes if n.op == "call_function" and n.target is row_exact)
        assert attn.kwargs["enable_gqa"] is True
        assert torch.ops.aten.expand.default not in _targets(fn.graph)  # no repeat_kv copy left
        assert torch.ops.aten._assert_tensor_metadata.default not in _targets(fn.graph)


def test_eager_lowering_changes_no_token():
    model = tiny_model("qwen2", dtype=torch.float32)
    heads = ExitHeads.random(model, (1, 3), seed=0)
    dec = AdaDecoder(model, heads, AdaDecodeConfig(threshold=0.02, max_pending=3))
    out = dec.generate([5, 6, 7, 8], max_new_tokens=24)
    assert out.stats.early_emitted > 5 and out.stats.rejected > 0
    dec.program = DecodeProgram(dec.gm)  # the unlowered segments: every attention through the op
    assert dec.generate([5, 6, 7, 8], max_new_tokens=24).new_tokens == out.new_tokens
