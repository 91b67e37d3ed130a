"""deferred_batching: each layer segment runs on its own block length.

The key property: with the K/V prefix of a layer already filled by earlier passes, running that layer on
only the last rows of a block (narrowed positional inputs) gives the rows a full-block pass would give.
"""
import operator

import pytest
import torch

from adadecode_fx.passes import PassSettings, deferred_batching, explicit_kv, split_layers
from adadecode_fx.passes.split_layers import segment_calls
from adadecode_fx.runtime import DecodeProgram, KVState
from tests.conftest import captured, tiny_model

S = PassSettings()  # every pass takes its settings; these tests need the defaults

FAMILIES = ["llama", "gpt_neox"]


def batched(family):
    return deferred_batching(explicit_kv(split_layers(captured(family), S), S), S)


def placeholders(sub):
    return [n for n in sub.graph.nodes if n.op == "placeholder"]


@pytest.mark.parametrize("family", FAMILIES)
def test_segments_take_no_symint(family):
    gm = split_layers(captured(family), S)
    L = gm.meta["num_layers"]
    before = sum(isinstance(p.meta.get("val"), torch.SymInt) for i in range(L)
                 for p in placeholders(getattr(gm, f"layer_{i}")))
    assert before > 0  # the plain split does hand sizes from the prologue to the layers
    gm = deferred_batching(explicit_kv(gm, S), S)
    calls = segment_calls(gm)
    for name in [f"layer_{i}" for i in range(L)] + ["epilogue"]:
        phs = placeholders(getattr(gm, name))
        assert not any(isinstance(p.meta.get("val"), torch.SymInt) for p in phs), name
        assert len(phs) == len(calls[name].args)
        for a in calls[name].args:  # no top-level size value is passed either
            assert not isinstance(a.meta.get("val"), torch.SymInt), (name, a.name)
    assert gm.meta["block_symbol"]


@pytest.mark.parametrize("family", FAMILIES)
def test_roles(family):
    gm = batched(family)
    L = gm.meta["num_layers"]
    calls = segment_calls(gm)
    for i in range(L):
        name = f"layer_{i}"
        phs = placeholders(getattr(gm, name))
        roles = [p.meta["role"] for p in phs]
        assert roles.count(("residual",)) == 1, roles
        assert all(r[0] in ("residual", "kv", "positional", "shared") for r in roles)
        args = dict(zip(phs, calls[name].args))
        res_arg = args[next(p for p in phs if p.meta["role"] == ("residual",))]
        # the residual is output 0 of the previous segment (the embedding for layer 0)
        assert res_arg.target is operator.getitem
        assert res_arg.args[0].target == ("prologue" if i == 0 else f"layer_{i - 1}")
        if i:
            assert res_arg.args[1] == 0
        pos = {args[p].name: (p.meta["role"][1], p.meta["val"]) for p in phs if p.meta["role"][0] == "positional"}
        # cache_position (dim 0), rotary cos/sin (rows on dim 1), the attention mask (rows on dim 2)
        assert pos["cache_position"][0] == 0
        mask = [v for d, v in pos.values() if v.dtype == torch.bool]
        assert len(mask) == 1 and mask[0].dim() == 4 and pos
        assert any(d == 2 and v.dtype == torch.bool for d, v in pos.values())
        rotary = [v for d, v in pos.values() if d == 1 and v.is_floating_point()]
        assert len(rotary) == 2
        # every positional input really has the block length on its position dim
        for d, v in pos.values():
            assert str(v.shape[d]) == gm.meta["block_symbol"]


# --------------------------------------------------------------------------- running layer by layer


def top_inputs(ids, a, b, kv):
    top = {"input_ids": ids[:, a:b], "cache_position": torch.arange(a, b)}
    top["position_ids"] = top["cache_position"][None]
    top["attention_mask"] = torch.ones(1, kv[0][0].shape[2], dtype=torch.long)
    for i, (k, v) in enumerate(kv):
        top[f"kv_{i}_0"], top[f"kv_{i}_1"] = k, v
    return top


def full_pass(prog, ids, a, b, kv):
    top = top_inputs(ids, a, b, kv)
    pro = prog.prologue(top)
    h = prog.embeddings(pro, b - a)
    for layer in range(prog.num_layers):
        h = prog.layer(layer, h, pro, top, kv)
    return prog.epilogue(h)


def reference(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
    with torch.no_grad():
        return ids, model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_full_pass_matches_model(family):
    model = tiny_model(family)
    prog = DecodeProgram(batched(family))
    ids, ref = reference(model, 9)
    state = KVState(prog.gm.meta["kv_shapes"], 16, torch.float64, "cpu", bucket=4)
    # prefill 0..5, then 6..8: two blocks, both through every layer
    first = full_pass(prog, ids, 0, 6, state.views(6))
    second = full_pass(prog, ids, 6, 9, state.views(9))
    torch.testing.assert_close(torch.cat([first, second], 1), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_deeper_layers_on_last_row_only(family):
    """Prologue and layer 0 on the whole block, layers 1.. on its last row only (their K/V already hold the
    earlier rows from a previous full pass): the last row's logits are the full-block ones."""
    model = tiny_model(family)
    prog = DecodeProgram(batched(family))
    N = 9
    ids, ref = reference(model, N, seed=1)
    state = KVState(prog.gm.meta["kv_shapes"], 16, torch.float64, "cpu", bucket=16)
    kv = state.views(N)
    full_pass(prog, ids, 0, N, kv)
    snapshot = [(k.clone(), v.clone()) for k, v in kv]

    def partial(kv):
        top = top_inputs(ids, 0, N, kv)
        pro = prog.prologue(top)
        h = prog.layer(0, prog.embeddings(pro, N), pro, top, kv)
        assert h.shape[1] == N
        h = h[:, -1:]
        for layer in range(1, prog.num_layers):
            h = prog.layer(layer, h, pro, top, kv)
            assert h.shape[1] == 1
        return prog.epilogue(h)

    torch.testing.assert_close(partial(kv), ref[:, -1:], atol=1e-10, rtol=0)
    for (k, v), (k0, v0) in zip(kv, snapshot):  # rewritten rows are the same rows
        torch.testing.assert_close(k, k0, atol=1e-10, rtol=0)
        torch.testing.assert_close(v, v0, atol=1e-10, rtol=0)

    # control: the earlier rows really come from the K/V prefix; without it the row is different
    blank = KVState(prog.gm.meta["kv_shapes"], 16, torch.float64, "cpu", bucket=16).views(N)
    blank[0] = kv[0]
    assert not torch.allclose(partial(blank), ref[:, -1:], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefill,early,total,exit_layer", [(5, 8, 11, 1), (3, 4, 6, 0), (6, 10, 11, 3)])
@torch.no_grad()
def test_deferred_rows_catch_up(family, prefill, early, total, exit_layer):
    """The AdaDecode schedule: positions [prefill, early) run only up to ``exit_layer`` (one block per
    token) and wait; the next block [early, total) runs the shallow layers on its own rows, then the
    deeper layers on the waiting rows and its own together. Logits equal the model's for all of them."""
    model = tiny_model(family)
    prog = DecodeProgram(batched(family))
    L = prog.num_layers
    ids, ref = reference(model, total, seed=prefill)
    state = KVState(prog.gm.meta["kv_shapes"], total + 3, torch.float64, "cpu", bucket=1 << 10)
    kv = state.views(total)  # longer than the sequence: unfilled rows must be masked off
    assert kv[0][0].shape[2] == total + 3

    torch.testing.assert_close(full_pass(prog, ids, 0, prefill, kv), ref[:, :prefill], atol=1e-10, rtol=0)
    for p in range(prefill, early):  # early tokens, one at a time: shallow layers only
        top = top_inputs(ids, prefill, p + 1, kv)  # blocks start at the deepest layer's fill
        pro = prog.prologue(top)
        h = prog.embeddings(pro, 1)
        for layer in range(exit_layer + 1):
            h = prog.layer(layer, h, pro, top, kv)
        state.park(exit_layer, h)
    parked = state.take_parked(exit_layer)
    assert parked.shape[1] == early - prefill

    top = top_inputs(ids, prefill, total, kv)
    pro = prog.prologue(top)
    h = prog.embeddings(pro, total - early)
    assert h.shape[1] == total - early
    for layer in range(exit_layer + 1):
        h = prog.layer(layer, h, pro, top, kv)
    h = torch.cat([parked, h], dim=1)
    for layer in range(exit_layer + 1, L):
        h = prog.layer(layer, h, pro, top, kv)
    assert h.shape[1] == total - prefill
    torch.testing.assert_close(prog.epilogue(h), ref[:, prefill:total], atol=1e-9, rtol=0)
