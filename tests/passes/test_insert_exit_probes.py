"""insert_exit_probes: probes after the exit layers, full-depth logits untouched."""
import pytest
import torch

from adadecode_fx import ExitHeads
from adadecode_fx.errors import UnsupportedModelError
from adadecode_fx.passes import ExitProbe, PassSettings, insert_exit_probes
from adadecode_fx.build import structural_graph
from tests.conftest import tiny_model

LAYERS = (1, 3)


def final_norm(model):
    base = model.base_model
    for name in ("norm", "final_layer_norm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise AssertionError(f"no final norm on {type(model).__name__}")


def run(gm, ids, S=None):
    T = ids.shape[1]
    S = S or T
    pos = torch.arange(T)
    kv = [t for ks, vs in gm.meta["kv_shapes"] for t in
          (torch.zeros(ks[0], ks[1], S, ks[3], dtype=torch.float64),
           torch.zeros(vs[0], vs[1], S, vs[3], dtype=torch.float64))]
    with torch.no_grad():
        return gm(ids, pos[None], pos, torch.ones(1, S, dtype=torch.long), *kv)


def probed(model, layers=LAYERS, seed=0, scale=1.0):
    heads = ExitHeads.random(model, layers, scale=scale, seed=seed)
    gm = insert_exit_probes(structural_graph(model), PassSettings(tuple(layers), heads))
    return gm, heads


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("T", [1, 6])
def test_probe_outputs(family, T):
    model = tiny_model(family)
    gm, heads = probed(model)
    names = dict(gm.named_children())
    assert {f"exit_probe_{l}" for l in LAYERS} <= set(names)
    assert not any(n.startswith("exit_probe_") and int(n.split("_")[-1]) not in LAYERS for n in names)
    assert all(isinstance(names[f"exit_probe_{l}"], ExitProbe) for l in LAYERS)
    assert gm.meta["exit_layers"] == LAYERS and gm.meta["num_model_outputs"] == 1

    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
    out = run(gm, ids, S=T + 2)
    assert len(out) == 1 + 2 * len(LAYERS)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    torch.testing.assert_close(out[0], ref.logits, atol=1e-10, rtol=0)

    norm, head = final_norm(model), model.get_output_embeddings()
    for k, layer in enumerate(LAYERS):
        token, conf = out[1 + 2 * k], out[2 + 2 * k]
        assert token.shape == (1, 1) and conf.shape == (1, 1)  # the last row only
        h = ref.hidden_states[layer + 1][:, -1:]
        with torch.no_grad():
            logits = head(norm(h @ heads.weight(layer).to(h.dtype).T))
        probs = torch.softmax(logits.float(), dim=-1)
        assert token.item() == logits.argmax(-1).item()
        assert 0.0 < conf.item() <= 1.0
        assert conf.item() == pytest.approx(probs.max().item(), rel=1e-5)


def test_probes_differ_per_layer_and_follow_heads():
    """Each probe reads its own layer through its own adapter: changing an adapter changes that probe only."""
    model = tiny_model("llama")
    ids = torch.arange(3, 11)[None]
    gm, _ = probed(model, seed=0, scale=0.0)  # identity adapters: the logit lens
    base = run(gm, ids)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        lens = [model.lm_head(model.model.norm(hs[l + 1][:, -1:])) for l in LAYERS]
    for k, l in enumerate(LAYERS):
        assert base[1 + 2 * k].item() == lens[k].argmax().item()
    gm.exit_probe_3.adapter.data.mul_(-1.0)  # norm(-h) = -norm(h): flips the logits of probe 3
    flipped = run(gm, ids)
    assert flipped[1].item() == base[1].item() and flipped[2].item() == base[2].item()
    assert flipped[3].item() == lens[1].argmin().item()
    torch.testing.assert_close(flipped[0], base[0], atol=0, rtol=0)


def test_cached_structure_is_not_modified():
    model = tiny_model("llama")
    probed(model)
    plain = structural_graph(model)
    assert not any(n.startswith("exit_probe") for n, _ in plain.named_children())
    outputs = next(n for n in plain.graph.nodes if n.op == "output").args[0]
    assert len(outputs) == 1
    assert len(run(plain, torch.arange(4)[None])) == 1


def test_no_exit_layers_is_a_no_op():
    model = tiny_model("llama")
    gm = structural_graph(model)
    before = [n.name for n in gm.graph.nodes]
    gm = insert_exit_probes(gm, PassSettings((), None))
    assert [n.name for n in gm.graph.nodes] == before and gm.meta["exit_layers"] == ()


def test_exit_layers_without_heads_raise():
    model = tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match="heads"):
        insert_exit_probes(structural_graph(model), PassSettings((1,), None))
