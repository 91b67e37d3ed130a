"""split_layers: prologue / layer_i / epilogue segments, cut exactly at decoder-layer boundaries."""
import operator
import re

import pytest
import torch
import transformers as tf
from torch import nn

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.errors import UnsupportedModelError
from adadecode_fx.passes import PassSettings
from adadecode_fx.passes.split_layers import find_layer_prefix, segment_calls, split_layers
from tests.conftest import assert_greedy_with_exits, captured, random_decoder, tiny_model

S = PassSettings()  # every pass takes its settings; these tests need the defaults

SPLIT_FAMILIES = ["llama", "gpt_neox"]
COMPUTE = ("call_function", "call_method", "call_module")


def kv_buffers(gm, seq, dtype=torch.float64):
    return [(torch.zeros(ks[0], ks[1], seq, ks[3], dtype=dtype), torch.zeros(vs[0], vs[1], seq, vs[3], dtype=dtype))
            for ks, vs in gm.meta["kv_shapes"]]


def call_split(gm, ids, kv):
    T = ids.shape[1]
    pos = torch.arange(T)
    flat = [t for pair in kv for t in pair]
    return gm(ids, pos[None], pos, torch.ones(1, kv[0][0].shape[2], dtype=torch.long), *flat)


def module_paths(node):
    return [str(path) for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


@pytest.mark.parametrize("family", SPLIT_FAMILIES)
def test_segments_in_call_order(family):
    gm = split_layers(captured(family), S)
    L = tiny_model(family).config.num_hidden_layers
    expected = ["prologue"] + [f"layer_{i}" for i in range(L)] + ["epilogue"]
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == expected
    assert [name for name, _ in gm.named_children()] == expected
    assert gm.meta["segments"] == expected and gm.meta["num_layers"] == L
    assert all(isinstance(getattr(gm, name), torch.fx.GraphModule) for name in expected)
    # the top level only wires segments together: no compute of its own
    top_fns = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert top_fns <= {operator.getitem}


@pytest.mark.parametrize("family", SPLIT_FAMILIES)
def test_layer_nodes_come_from_their_layer(family):
    gm = split_layers(captured(family), S)
    prefix = gm.meta["layer_prefix"]
    assert re.search(r"(^|\.)layers$", prefix), prefix
    L = gm.meta["num_layers"]
    own_layer = {}
    for i in range(L):
        sub = getattr(gm, f"layer_{i}")
        compute = [n for n in sub.graph.nodes if n.op in COMPUTE]
        assert len(compute) > 10, f"layer_{i} is suspiciously small"
        for node in compute:
            paths = module_paths(node)
            assert f"{prefix}.{i}" in paths, f"layer_{i} holds {node.name} from {paths}"
            assert not any(re.fullmatch(re.escape(prefix) + r"\.\d+", p) and p != f"{prefix}.{i}" for p in paths)
        own_layer[i] = sum(1 for n in compute if n.target is torch.ops.aten.index_copy_.default)
    assert own_layer == {i: 2 for i in range(L)}  # each layer writes its own K and V
    layer_path = re.compile(re.escape(prefix) + r"\.\d+$")
    for name in ("prologue", "epilogue"):
        for node in getattr(gm, name).graph.nodes:
            if node.op in COMPUTE:
                assert not any(layer_path.match(p) for p in module_paths(node)), (name, node.name)
    # the LM head lives in the epilogue, the token embedding in the prologue
    epi = [n for n in gm.epilogue.graph.nodes if n.op in COMPUTE]
    assert any(n.target is torch.ops.aten.linear.default for n in epi)
    assert any(n.target is torch.ops.aten.embedding.default for n in gm.prologue.graph.nodes)


@pytest.mark.parametrize("family", SPLIT_FAMILIES)
@pytest.mark.parametrize("T,S", [(7, 7), (5, 12)])
def test_split_module_matches_model(family, T, S):
    model = tiny_model(family)
    gm = split_layers(captured(family), S)
    g = torch.Generator().manual_seed(T * 100 + S)
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
    kv = kv_buffers(gm, S)
    with torch.no_grad():
        out = call_split(gm, ids, kv)
        ref = model(ids).logits
    logits = out[0] if isinstance(out, (tuple, list)) else out
    assert logits.dtype == torch.float64 and logits.shape == ref.shape
    torch.testing.assert_close(logits, ref, atol=1e-10, rtol=0)
    # every layer wrote rows [0, T) of its K and V and nothing beyond
    for k, v in kv:
        for buf in (k, v):
            assert buf[:, :, :T].abs().sum() > 0
            assert torch.count_nonzero(buf[:, :, T:]) == 0


@pytest.mark.parametrize("family", SPLIT_FAMILIES)
def test_split_does_not_touch_input_graph(family):
    gm = captured(family)
    before = [(n.op, n.name, n.target) for n in gm.graph.nodes]
    split = split_layers(gm, S)
    assert [(n.op, n.name, n.target) for n in gm.graph.nodes] == before
    # segments share the model's weights rather than copying them
    model = tiny_model(family)
    ptrs = {p.data_ptr() for p in model.parameters()}
    seg_tensors = [t for name in split.meta["segments"] for t in
                   list(getattr(split, name).parameters()) + list(getattr(split, name).buffers())]
    assert seg_tensors and any(t.data_ptr() in ptrs for t in seg_tensors)


class _Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


class _Stack(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(n)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        return self.head(x)


def test_find_layer_prefix_rejects_graph_without_layer_list():
    ep = torch.export.export(_Flat(), (torch.randn(2, 4),))
    with pytest.raises(UnsupportedModelError, match="numbered module list"):
        find_layer_prefix(ep.graph_module.graph)
    with pytest.raises(UnsupportedModelError):
        split_layers(ep.graph_module, S)


def test_find_layer_prefix_rejects_graph_without_module_stack():
    ep = torch.export.export(_Stack(), (torch.randn(2, 4),))
    graph = ep.graph_module.graph
    assert find_layer_prefix(graph) == ("blocks", 3)
    for node in graph.nodes:
        node.meta.pop("nn_module_stack", None)
    with pytest.raises(UnsupportedModelError, match="module stack"):
        find_layer_prefix(graph)


def test_find_layer_prefix_finds_custom_module_list():
    ep = torch.export.export(_Stack(4), (torch.randn(2, 4),))
    assert find_layer_prefix(ep.graph_module.graph) == ("blocks", 4)
    split = split_layers(ep.graph_module, S)
    assert list(segment_calls(split)) == ["prologue", "layer_0", "layer_1", "layer_2", "layer_3", "epilogue"]


@pytest.mark.parametrize("family", SPLIT_FAMILIES)
def test_find_layer_prefix_on_captured_model(family):
    prefix, n = find_layer_prefix(captured(family).graph)
    assert n == tiny_model(family).config.num_hidden_layers
    assert prefix.endswith(".layers")


def test_what_a_layer_computes_from_the_prologue_alone_for_later_layers_moves_to_the_prologue():
    """DeepSeek-V2 moves its complex rotary table to the device inside layer 0's attention, and the capture
    hands that node to every later layer: it goes to the prologue, and the model decodes with exits."""
    config = tf.DeepseekV2Config(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                 n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                 kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                 v_head_dim=8, first_k_dense_replace=1, n_shared_experts=1,
                                 max_position_embeddings=256)
    model = random_decoder(config, torch.float32)  # its experts take no float64
    dec = AdaDecoder(model, ExitHeads.random(model, (0, 2), scale=0.5, seed=1),
                     AdaDecodeConfig(threshold=0.02, max_pending=3))
    prologue_out = next(n for n in dec.program.gm.prologue.graph.nodes if n.op == "output").args[0]
    assert any(getattr(n.meta.get("val"), "dtype", None) == torch.complex64 for n in prologue_out)
    assert_greedy_with_exits(dec, model)
