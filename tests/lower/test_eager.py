"""Eager lowering: layers call the row-exact attention body directly, the shared segments keep the op."""
import pytest
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


def test_bf16_probes_read_their_adapter_through_the_block_kernel():
    from adadecode_fx.ops.linear import block_linear_kernel
    from tests.runtime.test_parity_bf16 import bf16_model

    op, why = block_linear_kernel()
    if op is None:
        pytest.skip(f"the block kernel is off here: {why}")
    model = bf16_model("qwen2")
    dec = AdaDecoder(model, ExitHeads.random(model, (0, 2), seed=0), AdaDecodeConfig(threshold=0.5))
    h = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    for layer, probe in dec.program.probe_fns.items():
        assert probe.linear is op
        plain = dec.program.probe_modules[layer]  # what sampling and the other lowerings start from
        assert plain.linear is None and plain.adapter.data_ptr() == probe.adapter.data_ptr()  # shared weights
        (tok, conf), (_, plain_conf) = probe(h), plain(h)
        assert torch.allclose(conf, plain_conf, rtol=0.05) and conf.shape == plain_conf.shape == tok.shape
    fp32 = tiny_model("qwen2", dtype=torch.float32)
    dec32 = AdaDecoder(fp32, ExitHeads.random(fp32, (1,), seed=0), AdaDecodeConfig(threshold=0.5))
    assert all(p.linear is None for p in dec32.program.probe_fns.values())


def test_repeat_kv_with_torch_211s_whole_slice_is_unrepeated_too():
    """torch 2.11's export writes ``repeat_kv`` as unsqueeze -> slice(0:) -> expand -> reshape; the no-op
    slice must not stop the rewrite (without it 2.11 kept the copy, and the K/V length in the expand
    kept every layer's one-row steps off the scripted path)."""
    from torch import fx
    from adadecode_fx.lower.eager import _unrepeat_kv

    graph = fx.Graph()
    q, k, v = graph.placeholder("q"), graph.placeholder("k"), graph.placeholder("v")
    a = torch.ops.aten

    def repeated(kv):
        x = graph.call_function(a.unsqueeze.default, (kv, 2))
        x = graph.call_function(a.slice.Tensor, (x, 3, 0, 9223372036854775807))
        x = graph.call_function(a.expand.default, (x, [1, 2, 2, 5, 8]))
        return graph.call_function(a.reshape.default, (x, [1, 4, 5, 8]))

    out = graph.call_function(row_exact, (q, repeated(k), repeated(v)))
    graph.output(out)
    _unrepeat_kv(graph)
    assert out.args[1:3] == (k, v) and out.kwargs["enable_gqa"] is True
    assert _targets(graph) == [row_exact]  # the whole chain is gone
    gm = fx.GraphModule(torch.nn.Module(), graph)
    qt, kt, vt = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(gm(qt, kt, vt), SDPA(qt, kt.repeat_interleave(2, 1), vt.repeat_interleave(2, 1)))
