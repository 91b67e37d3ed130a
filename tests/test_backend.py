"""The "adadecode" torch.compile backend: entry-point registration, the split graph it lowers, a
forward that matches eager, options checked at the first call, and decoding from the compiled object."""
import subprocess
import sys
import textwrap

import pytest
import torch

import adadecode_fx
from adadecode_fx import AdaDecodeError, ExitHeads
from adadecode_fx.backend import adadecode_backend, compiled_options

from tests.conftest import FAMILIES, hf_greedy, random_decoder, tiny_model


def test_registered_through_the_entry_point_without_import():
    code = textwrap.dedent("""
        import sys, torch, transformers as tf
        cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1)
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
        assert "adadecode_fx" not in sys.modules
        ids = torch.tensor([[1, 2, 3]])
        out = torch.compile(model, backend="adadecode")(ids).logits
        assert "adadecode_fx.backend" in sys.modules
        assert torch.allclose(out, model(ids).logits, atol=1e-5)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def _dynamo_graph(model, ids):
    seen = {}

    def record(gm, example_inputs, **kwargs):
        seen["gm"], seen["inputs"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record)(ids)
    return seen["gm"], seen["inputs"]


def test_backend_splits_the_dynamo_graph_at_layer_boundaries():
    model = tiny_model("llama", dtype=torch.float32)
    ids = torch.tensor([[3, 4, 5, 6]])
    gm, inputs = _dynamo_graph(model, ids)
    forward = adadecode_backend(gm, inputs)
    split = forward.__self__
    calls = [n.target for n in split.graph.nodes if n.op == "call_module"]
    assert calls == ["prologue"] + [f"layer_{i}" for i in range(model.config.num_hidden_layers)] + ["epilogue"]
    assert torch.equal(forward(*inputs)[0], gm(*inputs)[0])


def _compiled_and_eager(family: str, lowering: str, **kwargs):
    """The outputs of ``torch.compile(model, backend="adadecode")`` and of the model on the same call."""
    model = tiny_model(family, dtype=torch.float32)
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="adadecode", options={"backend": lowering})
    with torch.no_grad():
        return compiled(ids, **kwargs), model(ids, **kwargs)


def _assert_same(lowering: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if lowering == "eager":  # the same ATen ops in the same order: bit for bit (README)
        assert torch.equal(got, want)
    else:  # inductor's fused kernels round differently
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_compiled_forward_matches_eager(lowering):
    got, want = _compiled_and_eager("qwen2", lowering)
    _assert_same(lowering, got.logits, want.logits)


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_compiled_forward_through_graph_breaks_matches_eager(lowering):
    # output_hidden_states makes transformers register forward hooks, where dynamo breaks the graph:
    # the stretches between the breaks hold no whole layer list and run unsplit
    got, want = _compiled_and_eager("llama", lowering, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 5 + 1  # the embeddings and 5 layers
    for g, w in zip((got.logits,) + got.hidden_states, (want.logits,) + want.hidden_states):
        _assert_same(lowering, g, w)


def test_bad_options_fail_at_the_first_call_with_our_message():
    model = tiny_model("llama", dtype=torch.float32)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown adadecode option.*'gamma'"):
        torch.compile(model, backend="adadecode", options={"gamma": 0.9})(torch.tensor([[1, 2]]))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="'treshold' \\(did you mean 'threshold'\\?\\)"):
        torch.compile(model, backend="adadecode", options={"treshold": 0.9})(torch.tensor([[1, 2]]))
    with pytest.raises(Exception, match="threshold must be in"):
        torch.compile(model, backend="adadecode", options={"threshold": 1.5})(torch.tensor([[1, 2]]))


def test_generate_from_the_compiled_object_uses_its_options():
    model = tiny_model("llama", dtype=torch.float32)
    heads = ExitHeads.random(model, (1, 3), seed=0)
    compiled = torch.compile(model, backend="adadecode", options={"heads": heads, "threshold": 0.05})
    assert compiled_options(compiled)["threshold"] == 0.05
    ids = torch.tensor([[5, 6, 7, 8]])
    seq = adadecode_fx.generate(compiled, ids, max_new_tokens=24, eos_token_id=None)
    assert seq[0, 4:].tolist() == hf_greedy(model, [5, 6, 7, 8], 24)
    decoder = adadecode_fx.decoder_for(compiled)
    assert decoder.model is model and decoder.config.threshold == 0.05 and decoder.config.exit_layers == (1, 3)


def test_a_model_compiled_in_place_decodes_with_its_options():
    model = random_decoder(FAMILIES["llama"](), torch.float32)  # a copy of its own: compile() changes it
    heads = ExitHeads.random(model, (1, 3), seed=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    want = hf_greedy(model, [5, 6, 7, 8], 24)
    model.compile(backend="adadecode", options={"heads": heads, "threshold": 0.05})
    with torch.no_grad():  # model() runs the compiled call, model.forward() the model's own code
        assert torch.equal(model(ids).logits, model.forward(ids).logits)
    seq = adadecode_fx.generate(model, ids, max_new_tokens=24, eos_token_id=None)
    assert seq[0, 4:].tolist() == want
    decoder = adadecode_fx.decoder_for(model)
    assert decoder.model is model and decoder.config.threshold == 0.05 and decoder.config.exit_layers == (1, 3)
    other = random_decoder(FAMILIES["llama"](), torch.float32)
    other.compile(backend="eager")  # another backend: a model like any other, no options to take
    with pytest.raises(AdaDecodeError, match="no exit heads ship for this model"):
        adadecode_fx.generate(other, ids)


def test_generate_refuses_objects_not_compiled_by_us():
    model = tiny_model("llama", dtype=torch.float32)
    with pytest.raises(AdaDecodeError, match="not made by torch.compile.*backend='adadecode'"):
        adadecode_fx.generate(torch.compile(model, backend="eager"), torch.tensor([[1, 2]]))
    with pytest.raises(AdaDecodeError, match="no exit heads ship for this model"):
        adadecode_fx.generate(model, torch.tensor([[1, 2]]))
