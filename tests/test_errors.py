"""Bad input fails early with AdaDecodeError (a ValueError) that says what to do, and changes nothing."""
import pytest
import torch
import transformers as tf

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.zoo import models
from adadecode_fx.config import DEFAULT_THRESHOLD
from adadecode_fx.errors import AdaDecodeError, UnsupportedModelError
from tests.conftest import FAMILIES, hf_greedy, tiny_model


def snapshot(model):
    gen = getattr(model, "generation_config", None)  # encoder-only models have none
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, gen and gen.to_dict(),
            model.config.to_dict(), model.training)


def assert_unchanged(model, snap):
    weights, gen, cfg, training = snap
    now = model.state_dict()
    assert now.keys() == weights.keys()
    for k, v in weights.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    now_gen = getattr(model, "generation_config", None)
    assert (now_gen and now_gen.to_dict()) == gen
    assert model.config.to_dict() == cfg
    assert model.training == training


@pytest.fixture
def llama():
    model = tiny_model("llama")
    snap = snapshot(model)
    yield model
    assert_unchanged(model, snap)


@pytest.fixture(scope="module")
def plain_decoder():
    return AdaDecoder(tiny_model("llama"))


def test_error_hierarchy():
    assert issubclass(AdaDecodeError, ValueError)
    assert issubclass(UnsupportedModelError, AdaDecodeError)


# --------------------------------------------------------------------------------- config values


@pytest.mark.parametrize("threshold", [0, 0.0, -0.1, 1.5, True, False, "0.5", float("nan")])
def test_bad_threshold(threshold):
    with pytest.raises(AdaDecodeError, match=r"threshold must be in \(0, 1\]"):
        AdaDecodeConfig(threshold=threshold)


@pytest.mark.parametrize("threshold", [1e-9, 0.75, 1, 1.0])
def test_good_threshold(threshold):
    assert AdaDecodeConfig(threshold=threshold).threshold == threshold


def test_bad_threshold_through_decoder(llama):
    cfg = AdaDecodeConfig()
    cfg.threshold = 1.5  # bypassing __post_init__: the decoder validates again
    with pytest.raises(AdaDecodeError, match="threshold"):
        AdaDecoder(llama, None, cfg)


@pytest.mark.parametrize("layers", [(2, 1), (1, 1), (0, 3, 2)])
def test_exit_layers_not_increasing(layers):
    with pytest.raises(AdaDecodeError, match="strictly increasing"):
        AdaDecodeConfig(exit_layers=layers)


@pytest.mark.parametrize("layers", [(5,), (1, 5), (-1,), (2, 9)])
def test_exit_layer_out_of_range(llama, layers):
    heads = ExitHeads.identity(llama, [1, 2])
    cfg = AdaDecodeConfig(exit_layers=layers)
    with pytest.raises(AdaDecodeError, match=r"out of range.*0\.\.4"):
        AdaDecoder(llama, heads, cfg)
    assert cfg.exit_layers == layers and cfg.dtype == "auto"  # the user's config is left alone


@pytest.mark.parametrize("kwargs,match", [
    ({"max_pending": -1}, "max_pending"), ({"max_pending": 1.5}, "max_pending"),
    ({"kv_bucket": 0}, "kv_bucket"), ({"dtype": "int8"}, "unknown dtype"),
    ({"backend": "tvm"}, "unknown backend 'tvm'"),
])
def test_bad_config_fields(kwargs, match):
    with pytest.raises(AdaDecodeError, match=match):
        AdaDecodeConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given where CUDA is missing")
def test_tensorrt_without_cuda_says_what_to_use(llama):
    with pytest.raises(AdaDecodeError, match="tensorrt' needs a CUDA GPU.*use backend='inductor'"):
        AdaDecoder(llama, None, AdaDecodeConfig(backend="tensorrt"))


def test_dtype_mismatch(llama):
    cfg = AdaDecodeConfig(dtype="fp32")
    with pytest.raises(AdaDecodeError, match="model is float64 but config.dtype is float32"):
        AdaDecoder(llama, None, cfg)
    assert next(llama.parameters()).dtype == torch.float64


def test_exit_layers_without_heads(llama):
    with pytest.raises(AdaDecodeError, match="no heads"):
        AdaDecoder(llama, None, AdaDecodeConfig(exit_layers=(1,)))


def test_heads_missing_a_layer(llama):
    with pytest.raises(AdaDecodeError, match=r"no head for exit layers \[2\]"):
        AdaDecoder(llama, ExitHeads.identity(llama, [1]), AdaDecodeConfig(exit_layers=(1, 2)))


def test_config_round_trip_rejects_bad_values():
    cfg = AdaDecodeConfig(exit_layers=(1, 2), threshold=0.3)
    assert AdaDecodeConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(AdaDecodeError):
        AdaDecodeConfig.from_json(cfg.to_json().replace("0.3", "3.0"))


# --------------------------------------------------------------------------------- generate inputs


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "8", None])
def test_bad_max_new_tokens(plain_decoder, llama, n):
    with pytest.raises(AdaDecodeError, match="max_new_tokens must be an integer >= 1"):
        plain_decoder.generate([1, 2, 3], max_new_tokens=n)


@pytest.mark.parametrize("prompt", [[], torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long), [[]]])
def test_empty_prompt(plain_decoder, llama, prompt):
    with pytest.raises(AdaDecodeError, match="prompt is empty"):
        plain_decoder.generate(prompt, max_new_tokens=2)


def test_right_padded_batch(plain_decoder, llama):
    with pytest.raises(AdaDecodeError, match="not left-padded"):
        plain_decoder.generate(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
                               max_new_tokens=2)


def test_bad_shape(plain_decoder, llama):
    with pytest.raises(AdaDecodeError, match=r"\[batch, length\]"):
        plain_decoder.generate(torch.ones(1, 1, 3, dtype=torch.long), max_new_tokens=2)


@pytest.mark.parametrize("kwargs,match", [
    ({"foo": 1}, r"unknown AdaDecoder.generate argument\(s\) 'foo'; valid: input_ids"),
    ({"max_new_token": 3}, r"'max_new_token' \(did you mean 'max_new_tokens'\?\)"),
    ({"do_sample": True, "temprature": 0.7}, r"'temprature' \(did you mean 'temperature'\?\)"),
])
def test_a_misspelt_generate_argument_is_named(plain_decoder, llama, kwargs, match):
    with pytest.raises(AdaDecodeError, match=match):
        plain_decoder.generate([5, 6, 7], **kwargs)


def test_numpy_ids_decode_as_the_tensor(plain_decoder, llama):
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    want = plain_decoder.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0).sequences
    got = plain_decoder.generate(ids.numpy(), attention_mask=mask.numpy(), max_new_tokens=3, pad_token_id=0)
    assert torch.equal(got.sequences, want)


@pytest.mark.parametrize("prompt,bad", [([5, 128], 128), ([-1, 3], -1), (torch.tensor([[1, 500]]), 500)])
def test_token_out_of_vocab(plain_decoder, llama, prompt, bad):
    with pytest.raises(AdaDecodeError, match=rf"token ids \[{bad}\] are outside the vocabulary \(size 128\)"):
        plain_decoder.generate(prompt, max_new_tokens=2)


def test_decoder_still_works_after_errors(plain_decoder, llama):
    for bad in ([], [999]):
        with pytest.raises(AdaDecodeError):
            plain_decoder.generate(bad, max_new_tokens=3)
    prompt = [4, 9, 2, 7]
    assert plain_decoder.generate(prompt, max_new_tokens=5).new_tokens == hf_greedy(llama, prompt, 5)


def test_user_config_not_mutated(llama):
    cfg = AdaDecodeConfig(threshold=0.4)
    dec = AdaDecoder(llama, ExitHeads.identity(llama, [2]), cfg)
    assert cfg.dtype == "auto" and cfg.exit_layers == ()
    assert dec.config.dtype == "float64" and dec.config.exit_layers == (2,)


# --------------------------------------------------------------------------------- unsupported models


def test_encoder_decoder_model():
    torch.manual_seed(0)
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                   num_heads=2, decoder_start_token_id=0)).eval()
    snap = snapshot(t5)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder.*AutoModelForCausalLM"):
        AdaDecoder(t5)
    assert_unchanged(t5, snap)


def _bert_config():
    return tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)


def test_bert_encoder_without_lm_head():
    torch.manual_seed(0)
    bert = tf.BertModel(_bert_config()).eval()
    snap = snapshot(bert)
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        AdaDecoder(bert)
    assert_unchanged(bert, snap)


def test_masked_lm_is_unsupported():
    torch.manual_seed(0)
    bert = tf.BertForMaskedLM(_bert_config()).eval()
    snap = snapshot(bert)
    with pytest.raises(UnsupportedModelError):
        AdaDecoder(bert)
    assert_unchanged(bert, snap)


def test_masked_lm_is_rejected_before_capture(monkeypatch):
    def no_capture(model):
        raise AssertionError("tried to capture a masked LM")

    monkeypatch.setattr("adadecode_fx.capture.capture", no_capture)  # cached_capture looks it up when called
    with pytest.raises(UnsupportedModelError, match="causal"):
        AdaDecoder(tf.BertForMaskedLM(_bert_config()).eval())


_STATEFUL = {  # decoders with layers whose state is not attention K/V: SSM, hybrid, linear attention
    "mamba": lambda: tf.MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2),
    "falcon_h1": lambda: tf.FalconH1Config(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=32,
                                           mamba_n_heads=4, mamba_d_head=8, mamba_d_state=4),
    "qwen3_next": lambda: tf.Qwen3NextConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=8, num_experts=2, num_experts_per_tok=1,
                                             moe_intermediate_size=16, shared_expert_intermediate_size=16),
}


@pytest.mark.parametrize("family", sorted(_STATEFUL))
def test_decoders_with_state_beyond_attention_kv_are_refused_clearly(family):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_STATEFUL[family]()).eval()
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"layers \(config\..*state other than attention K/V.*"
                                                    r"model\.generate"):
        AdaDecoder(model)
    assert_unchanged(model, snap)


def test_several_residual_streams_are_refused_clearly():
    """Gemma 3n's AltUp carries four hidden-state streams ([4, B, T, d]) from layer to layer."""
    config = tf.Gemma3nTextConfig(vocab_size=64, vocab_size_per_layer_input=64, hidden_size=32, intermediate_size=32,
                                  hidden_size_per_layer_input=8, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, laurel_rank=4, num_kv_shared_layers=2,
                                  layer_types=["sliding_attention", "full_attention"] * 2,
                                  activation_sparsity_pattern=[0.0] * 4)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"shape \[4, .*not \[batch, tokens, width\].*model\.generate"):
        AdaDecoder(model)
    assert_unchanged(model, snap)


def test_a_layer_that_cannot_run_on_attention_kv_alone_is_refused_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("ADADECODE_CAPTURE_CACHE", str(tmp_path))  # no capture of this structure to reuse
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(FAMILIES["llama"]()).eval()  # an object no decoder has seen
    layer = model.model.layers[1]

    def wants_a_state_of_its_own(*args, **kwargs):  # what a convolution layer does with a K/V-only cache
        raise IndexError("list index out of range")

    monkeypatch.setattr(layer, "forward", wants_a_state_of_its_own)
    with pytest.raises(UnsupportedModelError, match=r"cannot run with a cache of attention K/V only "
                                                    r"\(IndexError: list index out of range\).*model\.generate"):
        AdaDecoder(model)


def test_a_model_wrapping_its_text_decoder_is_refused_clearly():
    model = tiny_model("llama", dtype=torch.float32)
    config = model.config

    class WrapperConfig(type(config)):  # what a speech or multimodal config looks like from outside
        def __getattribute__(self, name):
            if name == "num_hidden_layers":
                raise AttributeError(name)
            return super().__getattribute__(name)

    try:
        model.config = WrapperConfig.from_dict(config.to_dict())
        with pytest.raises(UnsupportedModelError, match="has no num_hidden_layers.*text decoder alone"):
            AdaDecoder(model)
    finally:
        model.config = config


def test_a_model_export_cannot_trace_fails_in_a_few_lines(monkeypatch, capfd):
    """torch.export prints the partial graph (130 lines here) and logs warnings when it gives up; the
    user sees our one-line error only."""
    import contextlib

    import adadecode_fx.capture as capture

    monkeypatch.setenv("ADADECODE_CAPTURE_CACHE", "off")
    # dynamic RoPE, captured as it is: its per-call update branches on a device value
    monkeypatch.setattr(capture, "default_frequencies_for_dynamic", lambda model: contextlib.nullcontext())
    config = tf.LlamaConfig(num_key_value_heads=2, vocab_size=128, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UnsupportedModelError, match="could not capture LlamaForCausalLM"):
        AdaDecoder(model)
    out, err = capfd.readouterr()
    assert len((out + err).strip().splitlines()) <= 3, err


def test_not_a_hf_model():
    with pytest.raises(UnsupportedModelError, match="PreTrainedModel"):
        AdaDecoder(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("compiled", [False, True])
def test_a_models_forward_is_refused_with_a_way_out(llama, compiled):
    import adadecode_fx

    forward = torch.compile(llama.forward, backend="adadecode") if compiled else llama.forward
    with pytest.raises(UnsupportedModelError, match="got a method of LlamaForCausalLM: pass the model itself"):
        adadecode_fx.generate(forward, torch.tensor([[1, 2]]), max_new_tokens=2)


def test_unknown_zoo_name(tmp_path):
    with pytest.raises(AdaDecodeError, match="unknown model 'no-such-model'.*smollm2-135m"):
        models.load("no-such-model")
    with pytest.raises(AdaDecodeError, match="no config.json"):
        models.load(str(tmp_path))
    with pytest.raises(AdaDecodeError, match="unknown dtype"):
        models.load("smollm2-135m", dtype="int3")


# --------------------------------------------------------------------------------- lengths


def test_generation_beyond_the_models_positions(plain_decoder, llama):
    # the tiny models have max_position_embeddings = 256
    with pytest.raises(AdaDecodeError, match=r"max_new_tokens \(1,000,000,000\).*at most 253"):
        plain_decoder.generate([1, 2, 3], max_new_tokens=10 ** 9)
    with pytest.raises(AdaDecodeError, match="prompt has 300 tokens.*at most 256 positions.*shorten the prompt"):
        plain_decoder.generate([1] * 300, max_new_tokens=1)


def test_kv_cache_too_large_without_a_position_limit(plain_decoder, llama, monkeypatch):
    monkeypatch.setattr(plain_decoder.program, "max_positions", None)
    with pytest.raises(AdaDecodeError, match=r"cannot allocate the K/V cache .* GiB.*lower max_new_tokens"):
        plain_decoder.generate([1, 2, 3], max_new_tokens=10 ** 13)


def test_threshold_per_exit_layer():
    cfg = AdaDecodeConfig(exit_layers=(1, 4), threshold={"4": 0.97, 1: 0.8})  # JSON gives string keys
    assert cfg.threshold == {1: 0.8, 4: 0.97} and cfg.gamma(1) == 0.8 and cfg.gamma(4) == 0.97
    assert AdaDecodeConfig.from_json(cfg.to_json()).threshold == cfg.threshold
    with pytest.raises(AdaDecodeError, match=r"threshold must be in \(0, 1\]"):
        AdaDecodeConfig(threshold={1: 0.8, 4: 1.2})
    with pytest.raises(AdaDecodeError, match=r"no gamma for exit layer\(s\) \[4\]"):
        AdaDecodeConfig(exit_layers=(1, 4), threshold={1: 0.8})
    with pytest.raises(AdaDecodeError, match=r"gamma for layer\(s\) \[2\] that are not exit layers"):
        AdaDecodeConfig(exit_layers=(1,), threshold={1: 0.8, 2: 0.9})
    with pytest.raises(AdaDecodeError, match="layers must be integers"):
        AdaDecodeConfig(threshold={"last": 0.8})


def test_threshold_text_as_the_command_line_gives_it():
    from adadecode_fx.config import parse_threshold

    assert parse_threshold("0.9") == 0.9
    assert parse_threshold(" 7:0.8, 23:0.97 ") == {7: 0.8, 23: 0.97}
    for bad in ("high", "7:0.8:1", "7=0.8", ":"):
        with pytest.raises(AdaDecodeError, match="threshold"):
            parse_threshold(bad)


def test_threshold_per_layer_resolves_against_heads(llama):
    heads = ExitHeads.identity(llama, [1, 2])
    # a mapping alone picks the exit layers; the last layer (4) needs no trained head
    cfg = AdaDecodeConfig(threshold={2: 0.6, 4: 0.95}).resolve(heads, 5)
    assert cfg.exit_layers == (2, 4) and cfg.threshold == {2: 0.6, 4: 0.95}
    heads.metadata["recommended_threshold"] = {"1": 0.7, "4": 0.97}  # calibrated per layer, as heads.json holds it
    heads.metadata["recommended_exit_layers"] = [1, 4]
    assert AdaDecodeConfig().resolve(heads, 5).threshold == {1: 0.7, 4: 0.97}
    # layers chosen by the user: calibrated gammas where there are some, the default elsewhere
    assert AdaDecodeConfig(exit_layers=(1, 2)).resolve(heads, 5).threshold == {1: 0.7, 2: DEFAULT_THRESHOLD}
    assert AdaDecodeConfig(exit_layers=(1,)).resolve(heads, 5).threshold == 0.7  # one layer: one gamma
    assert AdaDecodeConfig(exit_layers=(1, 2), threshold=0.9).resolve(heads, 5).threshold == 0.9
