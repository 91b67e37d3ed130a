"""Scripted decode rows: one-row layer steps run a TorchScript trace that must equal the FX code bit for bit,
at every K/V length after the one it was traced at; whatever cannot be traced keeps the FX code."""
import pytest
import torch

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.lower import scripted_rows
from adadecode_fx.lower.scripted_rows import ScriptedRows

from tests.conftest import hf_greedy, tiny_model


def _decoder(family, dtype, **options):
    model = tiny_model(family, dtype=dtype)
    heads = ExitHeads.random(model, (1, 3), scale=0.5, seed=0)
    return model, AdaDecoder(model, heads, AdaDecodeConfig(threshold=0.02, max_pending=3, **options))


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _record_one_row_calls(dec):
    """Wrap every layer so each one-row call also stores a clone of its arguments."""
    calls = []

    def spy(i, layer):
        def call(*args):
            if args[layer.residual].shape[1] == 1:
                calls.append((i, _clone(args)))
            return layer(*args)
        return call

    layers = list(dec.program.layer_fns)
    dec.program.layer_fns = [spy(i, f) for i, f in enumerate(layers)]
    return layers, calls


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_trace_equals_fx_at_every_kv_length(family, dtype):
    model, dec = _decoder(family, dtype)
    layers, calls = _record_one_row_calls(dec)
    dec.generate(list(range(3, 9)), max_new_tokens=20)
    assert all(isinstance(f, ScriptedRows) for f in layers)
    lengths = set()
    for i, args in calls:
        layer = layers[i]
        assert layer.traces.get(1) is not None, (i, layer.failure)
        fx_out = layer.gm(*_clone(args))[0]
        traced_out = layer(*_clone(args))[0]
        assert torch.equal(fx_out, traced_out), i
        lengths.add(max(a.shape[2] for a in args if isinstance(a, torch.Tensor) and a.dim() == 4))
    assert len(lengths) > 5  # one trace per layer, run over many K/V lengths


def test_scripted_rows_keep_greedy_parity_with_many_exits():
    model, dec = _decoder("llama", torch.bfloat16)
    prompt = list(range(10, 30))
    out = dec.generate(prompt, max_new_tokens=30)
    assert out.stats.early_emitted > 0 and out.new_tokens == hf_greedy(model, prompt, 30)


def test_segments_sized_by_kv_length_keep_their_fx_code():
    # Gemma2's eager attention expands K/V to their length: a trace would freeze it
    model, dec = _decoder("gemma2", torch.float32)
    assert not any(isinstance(f, ScriptedRows) for f in dec.program.layer_fns)
    prompt = [4, 5, 6]
    assert dec.generate(prompt, max_new_tokens=12).new_tokens == hf_greedy(model, prompt, 12)


def test_switched_off_by_config():
    _, dec = _decoder("llama", torch.float32, script_rows=False)
    assert isinstance(dec.program.layer_fns[0], torch.fx.GraphModule)


def test_no_trace_while_a_cpu_fuser_is_on(monkeypatch):
    monkeypatch.setattr(scripted_rows, "_fusers_off", lambda: False)
    model, dec = _decoder("llama", torch.float32)
    prompt = [7, 8, 9]
    assert dec.generate(prompt, max_new_tokens=8).new_tokens == hf_greedy(model, prompt, 8)
    assert all(not f.traces for f in dec.program.layer_fns)


def test_a_failed_trace_falls_back_to_fx(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.jit, "trace", broken)
    model, dec = _decoder("qwen2", torch.float32)
    prompt = [7, 8, 9, 10]
    assert dec.generate(prompt, max_new_tokens=8).new_tokens == hf_greedy(model, prompt, 8)
    layer = dec.program.layer_fns[0]
    assert layer.traces == {1: None} and "cannot trace this" in layer.failure
