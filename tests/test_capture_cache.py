"""The on-disk capture cache: a loaded graph is the captured one, bound to the model it is loaded for;
a key changes with what the graph depends on; an entry that cannot be used is captured again."""
from __future__ import annotations

import pickle

import pytest
import torch
import transformers as tf

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads, capture_cache
from adadecode_fx.capture import capture
from adadecode_fx.passes import PASSES, PassSettings, insert_exit_probes, run_passes

from conftest import FAMILIES, hf_greedy, tiny_model

STRUCTURAL = [p for p in PASSES if p is not insert_exit_probes]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADADECODE_CAPTURE_CACHE", str(tmp_path))
    return tmp_path


def _graph_modules(gm):
    return [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]


def _shape(val):
    return str(getattr(val, "shape", val))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loaded_graph_passes_to_the_same_segments(family, cache):
    model = tiny_model(family)
    gm = capture(model)
    path = cache / "entry.pkl"
    capture_cache.save(gm, model, path)
    loaded = capture_cache.load(path, model)
    assert loaded.code == gm.code
    assert loaded.meta == gm.meta
    fresh, again = (run_passes(g, PassSettings(), passes=STRUCTURAL) for g in (gm, loaded))
    assert [type(m).__name__ for m in _graph_modules(fresh)] == [type(m).__name__ for m in _graph_modules(again)]
    for a, b in zip(_graph_modules(fresh), _graph_modules(again)):
        assert a.code == b.code
        for x, y in zip(a.graph.nodes, b.graph.nodes):
            assert (x.name, x.meta.get("role")) == (y.name, y.meta.get("role"))
            assert _shape(x.meta.get("val")) == _shape(y.meta.get("val"))
    assert {k: v for k, v in fresh.meta.items()} == {k: v for k, v in again.meta.items()}


def test_weights_are_bound_to_the_model_loaded_for_not_stored(cache):
    """Two models of one structure share a key; the second decodes with its own weights."""
    first, second = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert capture_cache.cache_key(first) == capture_cache.cache_key(second)
    path = cache / "entry.pkl"
    capture_cache.save(capture(first), first, path)
    assert path.stat().st_size < sum(p.numel() * p.element_size() for p in first.parameters())
    loaded = capture_cache.load(path, second)
    names = {id(t) for t in second.parameters()}
    bound = [getattr(loaded, n.target) for n in loaded.graph.nodes if n.op == "get_attr"]
    assert sum(id(t) in names for t in bound) == len(list(second.parameters()))


def test_a_second_model_object_decodes_from_the_cache_without_capturing(cache, monkeypatch):
    first, second = (tiny_model.__wrapped__("qwen2", seed=s) for s in (0, 2))  # objects no other test built
    heads = ExitHeads.random(first, (2,), seed=0)
    config = AdaDecodeConfig(threshold=0.02, max_pending=4)  # exits often, often wrong
    AdaDecoder(first, heads, config)
    assert len(list(cache.glob("*.pkl"))) == 1

    def no_capture(model):
        raise AssertionError("captured although the cache holds this structure")

    monkeypatch.setattr("adadecode_fx.capture.capture", no_capture)
    heads2 = ExitHeads.random(second, (2,), seed=0)
    out = AdaDecoder(second, heads2, config).generate(torch.tensor([[3, 1, 4, 1, 5]]), max_new_tokens=24)
    assert out.stats.accepted > 0 and out.stats.rejected > 0
    assert out.new_tokens == hf_greedy(second, [3, 1, 4, 1, 5], 24)


@pytest.mark.parametrize("change", [
    lambda c: setattr(c, "num_hidden_layers", 4),
    lambda c: setattr(c, "rope_theta", 5000.0),
    lambda c: setattr(c, "tie_word_embeddings", True),
])
def test_key_changes_with_the_structure(change):
    base = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    other = tf.LlamaConfig(**base.to_dict())
    change(other)
    torch.manual_seed(0)
    a, b = (tf.LlamaForCausalLM(c).eval() for c in (base, other))
    assert capture_cache.cache_key(a) != capture_cache.cache_key(b)
    assert capture_cache.cache_key(a) != capture_cache.cache_key(a.to(torch.float64))


def test_key_changes_with_the_attention_implementation():
    model = tiny_model("llama")
    key = capture_cache.cache_key(model)
    try:
        model.config._attn_implementation = "eager"
        assert capture_cache.cache_key(model) != key
    finally:
        model.config._attn_implementation = "sdpa"
    assert capture_cache.cache_key(model) == key


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _foreign_object(path):
    import os
    path.write_bytes(pickle.dumps({"format": 1, "nodes": [os.getcwd]}))


def _missing_parameter(path):
    record = pickle.loads(path.read_bytes())
    attr = next(a for a, v in record["attrs"].items() if v[0] == "model")
    record["attrs"][attr] = ("model", "model.no_such_weight", True)
    path.write_bytes(pickle.dumps(record))


def _old_format(path):
    record = pickle.loads(path.read_bytes())
    record["format"] = 0
    path.write_bytes(pickle.dumps(record))


@pytest.mark.parametrize("spoil", [_truncate, _foreign_object, _missing_parameter, _old_format])
def test_an_unusable_entry_is_captured_again_and_replaced(spoil, cache, capsys):
    model = tiny_model("llama")
    path = capture_cache.path_for(model)
    capture_cache.cached_capture(model)
    good = path.read_bytes()
    spoil(path)
    capsys.readouterr()
    gm = capture_cache.cached_capture(model)
    assert "cannot be used" in capsys.readouterr().err
    assert gm.code == capture(model).code
    assert path.read_bytes() == good
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind
    capture_cache.load(path, model)


def test_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ADADECODE_CAPTURE_CACHE", "off")
    monkeypatch.setenv("ADADECODE_CACHE", str(tmp_path))
    assert capture_cache.path_for(tiny_model("llama")) is None
    capture_cache.cached_capture(tiny_model("llama"))
    assert list(tmp_path.iterdir()) == []


def test_default_location_is_under_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("ADADECODE_CAPTURE_CACHE", raising=False)
    monkeypatch.setenv("ADADECODE_CACHE", str(tmp_path))
    assert capture_cache.cache_location() == tmp_path / "captures"


def test_a_graph_the_cache_cannot_store_is_still_built(cache, monkeypatch, capsys):
    model = tiny_model.__wrapped__("llama", seed=9)

    def refuse(gm, model):
        raise capture_cache.CaptureCacheError("cannot store call target <a higher-order op>")

    monkeypatch.setattr(capture_cache, "encode", refuse)
    gm = capture_cache.cached_capture(model)
    assert "could not cache the capture" in capsys.readouterr().err
    assert gm.code == capture(model).code and list(cache.iterdir()) == []



def test_an_unranged_capture_is_retried_stored_and_decodes(cache, monkeypatch):
    """torch 2.11 refuses the ranged K/V width ("Constraints violated"): capture retries with it unranged,
    and that graph (an ``int_oo`` bound) is stored, reloaded and decodes like any other. Other export
    errors are not retried."""
    import adadecode_fx.capture as cap
    from adadecode_fx.errors import UnsupportedModelError

    real, widths = cap._export, []

    def refuse_the_ranged_width(wrapper, args, dyn):
        widths.append(dyn[3][1])
        if widths[-1] is not torch.export.Dim.DYNAMIC:
            raise RuntimeError("Constraints violated (S)! For more information, run with TORCH_LOGS=+dynamic")
        return real(wrapper, args, dyn)

    monkeypatch.setattr(cap, "_export", refuse_the_ranged_width)
    model = tiny_model.__wrapped__("llama", seed=3)  # an object no other test built
    heads = ExitHeads.random(model, (1, 3), seed=0)
    config = AdaDecodeConfig(threshold=0.02, max_pending=3)
    prompt = [5, 6, 7]
    out = AdaDecoder(model, heads, config).generate(prompt, 16, eos_token_id=None)
    assert len(widths) == 2 and widths[1] is torch.export.Dim.DYNAMIC
    assert out.new_tokens == hf_greedy(model, prompt, 16) and out.stats.early_emitted > 0
    assert len(list(cache.glob("*.pkl"))) == 1, "the unranged capture was not stored"

    def boom(*args):
        widths.append("boom")
        raise RuntimeError("boom")

    monkeypatch.setattr(cap, "_export", boom)  # a rebuild must read the stored graph, not export
    again = AdaDecoder(model, heads, config).generate(prompt, 16, eos_token_id=None)
    assert again.new_tokens == out.new_tokens and len(widths) == 2
    with pytest.raises(UnsupportedModelError, match="boom"):
        capture(model)
    assert widths[2:] == ["boom"], "an error other than the constraint violation was retried"
