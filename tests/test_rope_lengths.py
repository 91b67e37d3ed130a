"""RoPE whose frequencies depend on the call's length: longrope's switch and dynamic NTK scaling; and the
scalings fixed at load time (linear, Llama 3, YaRN), which need nothing but must stay exact."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.errors import AdaDecodeError
from adadecode_fx.rope_lengths import full_depth_positions

from tests.conftest import _COMMON, hf_greedy, random_decoder

SWITCH = 16  # longrope: short factors up to this many positions, long ones beyond


def _model(config, seed: int, dtype=torch.float64):
    """Not sharpened: a wrong rotary factor on a few deferred rows must be able to move an argmax."""
    return random_decoder(config, dtype, seed, sharpen=False)


def _longrope(**fields):
    common = {**_COMMON, "max_position_embeddings": 64, **fields}
    return tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, original_max_position_embeddings=SWITCH,
                         rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 4,
                                          "long_factor": [40.0] * 4, "rope_theta": 10000.0}, **common)


def _dynamic():
    return tf.LlamaConfig(num_key_value_heads=2, **{**_COMMON, "max_position_embeddings": 72},
                          rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})


def _exits_everywhere(model, seed: int, **config):
    heads = ExitHeads.random(model, [1, 3], scale=1.0, seed=seed)
    return AdaDecoder(model, heads, AdaDecodeConfig(threshold=1e-6, max_pending=5, kv_bucket=1, **config))


def test_positions_that_must_not_exit_come_from_the_config():
    assert full_depth_positions(_longrope().get_text_config()) == {SWITCH - 1}
    assert full_depth_positions(_dynamic()) == frozenset()
    assert full_depth_positions(tf.LlamaConfig(**_COMMON)) == frozenset()
    per_type = tf.LlamaConfig(**_COMMON)
    per_type.rope_parameters = {"full_attention": {"rope_type": "longrope", "original_max_position_embeddings": 8},
                                "sliding_attention": {"rope_type": "default"}}
    assert full_depth_positions(per_type) == {7}


@pytest.mark.parametrize("backend", ["eager", "cudagraphs"])
def test_longrope_decodes_across_its_switch_like_hf(backend):
    """Every step exits where it may. Without the full-depth step before the switch, rows deferred from
    before it were batched with rows after it and took the long factors: seed 2 parted from HF greedy at
    new token 18 (eager), three positions past the switch."""
    early = 0
    for seed in (2, 3):
        model = _model(_longrope(), seed)
        dec = _exits_everywhere(model, seed, backend=backend)
        assert dec.program.full_depth_positions == {SWITCH - 1}
        for prompt in ([5, 6, 7], list(range(9, 21))):
            out = dec.generate(prompt, 30, eos_token_id=None)
            assert out.new_tokens == hf_greedy(model, prompt, 30)
            early += out.stats.early_emitted
    assert early >= 200


def test_dynamic_rope_is_captured_and_exact_up_to_its_limit():
    """The per-call update branches on a device value (export cannot capture it); up to
    max_position_embeddings it leaves the default frequencies, and decoding stops there."""
    early = 0
    for seed in (0, 1):  # the second model binds the first one's cached capture (float32, as HF grows them)
        model = random_decoder(_dynamic(), torch.float32, seed)
        if seed:  # a long call grows HF's frequencies, which the cached graph must not bind
            model(torch.zeros(1, 1000, dtype=torch.long))
            assert model.model.rotary_emb.max_seq_len_cached == 1000
        dec = _exits_everywhere(model, seed)
        rotary = model.model.rotary_emb
        assert rotary.rope_type == "dynamic"  # put back after the capture
        bound = [b for name, b in dec.program.gm.named_buffers() if name.endswith("inv_freq")]
        assert bound and all(torch.equal(b, rotary.original_inv_freq) for b in bound)
        for prompt in ([5, 6, 7], list(range(20, 45))):
            out = dec.generate(prompt, 40, eos_token_id=None)
            assert out.new_tokens == hf_greedy(model, prompt, 40)
            early += out.stats.early_emitted
    assert early >= 200
    with pytest.raises(AdaDecodeError, match="max_position_embeddings"):
        dec.generate([5, 6, 7], 70)


STATIC_SCALINGS = {
    "linear": {"factor": 4.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"factor": 8.0, "original_max_position_embeddings": 16},  # and its attention factor on cos / sin
}


@pytest.mark.parametrize("rope_type", sorted(STATIC_SCALINGS))
def test_rope_scalings_fixed_at_load_decode_like_hf(rope_type):
    """Llama 3.x checkpoints ship `llama3` scaling, long-context Qwen and DeepSeek ones YaRN: the frequencies
    (and YaRN's factor on cos / sin) are fixed when the model loads and reach every deferred row as they
    reach HF's one-row steps."""
    params = {"rope_type": rope_type, "rope_theta": 10000.0, **STATIC_SCALINGS[rope_type]}
    config = tf.LlamaConfig(num_key_value_heads=2, **{**_COMMON, "max_position_embeddings": 128},
                            rope_parameters=params)
    early = 0
    for seed in (0, 1):
        model = _model(config, seed)
        assert model.model.rotary_emb.rope_type == rope_type
        dec = _exits_everywhere(model, seed)
        assert full_depth_positions(config) == frozenset()
        for prompt in ([5, 6, 7], list(range(20, 45))):
            out = dec.generate(prompt, 40, eos_token_id=None)
            assert out.new_tokens == hf_greedy(model, prompt, 40)
            early += out.stats.early_emitted
    assert early >= 100


def test_longrope_batches_that_would_cross_the_switch_apart_are_refused():
    """One step computes every row with the furthest row's factors, so rows of unequal length would
    cross the switch at different steps (seed 2 parted from HF greedy that way, without heads)."""
    model = _model(_longrope(), seed=2)
    dec = AdaDecoder(model, None, AdaDecodeConfig())
    short, long = [5, 6, 7], list(range(9, 21))
    with pytest.raises(AdaDecodeError, match="one at a time"):
        dec.generate([short, long], 20, eos_token_id=None)
    for prompts, new in (([short, long], 4), ([long, long[::-1]], 20), ([long + long, long + long[:5]], 4)):
        out = dec.generate(prompts, new, eos_token_id=None)
        assert out.new_tokens == [hf_greedy(model, p, new) for p in prompts]


def test_an_onnx_export_keeps_the_full_depth_step(tmp_path):
    """A standalone export (no torch model at load time) carries the rule in its manifest."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from adadecode_fx.export import export_onnx
    from adadecode_fx.lower import onnxrt

    model = _model(_longrope(), seed=2, dtype=torch.float32)
    heads = ExitHeads.random(model, [1, 3], scale=1.0, seed=2)
    exported = onnxrt.load_exported(export_onnx(model, heads, AdaDecodeConfig(threshold=1e-6), tmp_path / "phi3"))
    assert exported.program.full_depth_positions == {SWITCH - 1}
    out = exported.generate([5, 6, 7], 30, eos_token_id=None)
    assert out.new_tokens == hf_greedy(model, [5, 6, 7], 30) and out.stats.early_emitted >= 40
