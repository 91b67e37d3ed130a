"""explicit_kv: every layer's K/V buffers are labelled, and each layer writes only its own."""

import pytest
import torch

from adadecode_fx.capture import KV_NAME
from adadecode_fx.errors import UnsupportedModelError
from adadecode_fx.passes import PassSettings, explicit_kv, split_layers
from adadecode_fx.passes.split_layers import segment_calls
from tests.conftest import captured, tiny_model

S = PassSettings()  # every pass takes its settings; these tests need the defaults

FAMILIES = ["llama", "gpt_neox"]


def labelled(family):
    return explicit_kv(split_layers(captured(family), S), S)


def kv_placeholders(gm, name):
    """(call argument name, placeholder) for every K/V buffer a segment receives."""
    call = segment_calls(gm)[name]
    phs = [n for n in getattr(gm, name).graph.nodes if n.op == "placeholder"]
    assert len(phs) == len(call.args)
    return [(a.name, ph) for a, ph in zip(call.args, phs) if KV_NAME.match(getattr(a, "name", ""))]


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_kv_roles(family):
    gm = labelled(family)
    L = gm.meta["num_layers"]
    assert L == tiny_model(family).config.num_hidden_layers
    for i in range(L):
        kv = kv_placeholders(gm, f"layer_{i}")
        assert sorted(name for name, _ in kv) == [f"kv_{i}_0", f"kv_{i}_1"]
        for name, ph in kv:
            assert ph.meta["role"] == ("kv", i, int(name[-1]))
        others = [ph for ph in getattr(gm, f"layer_{i}").graph.nodes
                  if ph.op == "placeholder" and ph.meta.get("role", ("",))[0] == "kv" and ph not in
                  [p for _, p in kv]]
        assert others == []
    # the epilogue never sees a buffer; the prologue at most reads a buffer's length
    assert kv_placeholders(gm, "epilogue") == []
    for _, ph in kv_placeholders(gm, "prologue"):
        assert ph.meta["role"] == ("kv_size",)
        assert all(u.target is torch.ops.aten.sym_size.int for u in ph.users)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_writes_cover_all_layers(family):
    gm = labelled(family)
    L = gm.meta["num_layers"]
    writes = gm.meta["kv_writes"]
    assert sorted(writes) == list(range(L))
    for i, names in writes.items():
        sub = getattr(gm, f"layer_{i}")
        nodes = {n.name: n for n in sub.graph.nodes}
        assert len(names) == 2
        written = set()
        for name in names:
            node = nodes[name]
            assert node.target is torch.ops.aten.index_copy_.default
            written.add(node.args[0].meta["role"])
        assert written == {("kv", i, 0), ("kv", i, 1)}


def test_rejects_layer_reading_another_layers_kv():
    gm = split_layers(captured("llama"), S)
    top = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    call = segment_calls(gm)["layer_1"]
    call.args = tuple(top["kv_0_0"] if getattr(a, "name", "") == "kv_1_0" else a for a in call.args)
    with pytest.raises(UnsupportedModelError, match="layer_1 reads the K/V of layer 0"):
        explicit_kv(gm, S)


def test_rejects_layer_that_never_writes_its_kv():
    gm = split_layers(captured("llama"), S)
    for node in gm.layer_2.graph.nodes:  # make layer 2 write a copy instead of its buffer
        if node.target is torch.ops.aten.index_copy_.default:
            node.target = torch.ops.aten.index_copy.default
    with pytest.raises(UnsupportedModelError, match="layer 2 never writes"):
        explicit_kv(gm, S)
