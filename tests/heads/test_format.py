"""ExitHeads: construction, save/load round trip, and refusing heads that belong to another model."""
import json

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads, model_fingerprint
from adadecode_fx.errors import AdaDecodeError, HeadsMismatchError
from adadecode_fx.heads.format import FORMAT, WEIGHTS_FILE
from tests.conftest import tiny_model


def other_shape_model(hidden=48, layers=5):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg).to(torch.float64).eval()


def test_identity():
    model = tiny_model("llama")
    heads = ExitHeads.identity(model, [3, 1])
    assert heads.layers == (1, 3)  # sorted
    d = model.config.hidden_size
    for l in (1, 3):
        assert torch.equal(heads.weight(l), torch.eye(d))
    assert heads.hidden_size == d and heads.num_layers == model.config.num_hidden_layers
    assert heads.fingerprint == model_fingerprint(model)
    assert heads.metadata == {"trained": False}
    assert heads.check(model) is heads


def test_random_is_seeded_noise_around_identity():
    model = tiny_model("llama")
    a = ExitHeads.random(model, [0, 2], scale=0.5, seed=3)
    b = ExitHeads.random(model, [0, 2], scale=0.5, seed=3)
    c = ExitHeads.random(model, [0, 2], scale=0.5, seed=4)
    eye = torch.eye(model.config.hidden_size)
    for l in (0, 2):
        assert torch.equal(a.weight(l), b.weight(l))
        assert not torch.equal(a.weight(l), c.weight(l))
        assert not torch.allclose(a.weight(l), eye, atol=1e-3)
    assert not torch.equal(a.weight(0), a.weight(2))  # one draw per layer
    assert a.metadata["random"] == {"scale": 0.5, "seed": 3}
    assert torch.equal(ExitHeads.random(model, [1], scale=0.0).weight(1), eye)


@pytest.mark.parametrize("via_file", [False, True])
def test_save_load_roundtrip(tmp_path, via_file):
    model = tiny_model("llama")
    heads = ExitHeads.random(model, [1, 3], scale=2.0, seed=7)
    heads.metadata.update(steps=123, note="héllo", nested={"lr": 1e-3, "layers": [1, 3]})
    out = heads.save(tmp_path / "heads")
    assert (out / WEIGHTS_FILE).is_file()
    info = json.loads((out / "heads.json").read_text())
    assert info["format"] == FORMAT and info["layers"] == [1, 3] and info["metadata"]["steps"] == 123
    loaded = ExitHeads.load(out / WEIGHTS_FILE if via_file else out, model)
    assert loaded.layers == heads.layers
    for l in heads.layers:
        assert torch.equal(loaded.weight(l), heads.weight(l))
    assert loaded.fingerprint == heads.fingerprint
    assert (loaded.hidden_size, loaded.num_layers) == (heads.hidden_size, heads.num_layers)
    assert loaded.metadata == heads.metadata
    # without a model: no check, same content
    assert ExitHeads.load(out).metadata == heads.metadata


def test_load_into_model_with_other_hidden_size(tmp_path):
    model = tiny_model("llama")
    ExitHeads.identity(model, [1]).save(tmp_path)
    other = other_shape_model(hidden=48)
    with pytest.raises(HeadsMismatchError, match="hidden size 32") as e:
        ExitHeads.load(tmp_path, other)
    assert "48" in str(e.value)
    with pytest.raises(HeadsMismatchError):
        AdaDecoder(other, ExitHeads.load(tmp_path), AdaDecodeConfig())


def test_load_into_model_with_other_depth(tmp_path):
    model = tiny_model("llama")
    ExitHeads.identity(model, [1]).save(tmp_path)
    with pytest.raises(HeadsMismatchError, match="5 layers"):
        ExitHeads.load(tmp_path, other_shape_model(hidden=32, layers=3))


def test_load_into_same_shape_other_weights(tmp_path):
    model, sibling = tiny_model("llama"), tiny_model("llama", seed=1)
    assert model_fingerprint(model) != model_fingerprint(sibling)
    ExitHeads.identity(model, [1, 2]).save(tmp_path)
    with pytest.raises(HeadsMismatchError, match="fingerprint"):
        ExitHeads.load(tmp_path, sibling)
    with pytest.raises(HeadsMismatchError, match="fingerprint"):
        AdaDecoder(sibling, ExitHeads.identity(model, [1]))
    assert ExitHeads.load(tmp_path, model).layers == (1, 2)


def test_fingerprint_ignores_dtype():
    """fp32 and fp64 copies of one checkpoint share heads (the sample is rounded to bf16)."""
    assert model_fingerprint(tiny_model("llama", dtype=torch.float32)) == model_fingerprint(tiny_model("llama"))


def test_corrupt_file(tmp_path):
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    with pytest.raises(HeadsMismatchError, match="not a readable heads file"):
        ExitHeads.load(tmp_path, tiny_model("llama"))


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"layer_1": torch.eye(32)}, str(path), metadata={"format": "pt"})
    with pytest.raises(HeadsMismatchError, match="not an adadecode-fx heads file"):
        ExitHeads.load(path, tiny_model("llama"))
    save_file({"lm_head.weight": torch.eye(32)}, str(path))
    with pytest.raises(HeadsMismatchError):
        ExitHeads.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(HeadsMismatchError, match="no heads file"):
        ExitHeads.load(tmp_path / "nowhere")
    with pytest.raises(HeadsMismatchError, match="no heads file"):
        ExitHeads.load(tmp_path)  # a directory without heads.safetensors


@pytest.mark.parametrize("layers", [[5], [-1], [1, 7]])
def test_identity_layer_out_of_range(layers):
    with pytest.raises(AdaDecodeError, match="out of range"):
        ExitHeads.identity(tiny_model("llama"), layers)


def test_wrong_weight_shape_and_missing_layer():
    with pytest.raises(HeadsMismatchError, match="shape"):
        ExitHeads({1: torch.eye(31)}, "x", 32, 5)
    heads = ExitHeads.identity(tiny_model("llama"), [1])
    with pytest.raises(HeadsMismatchError, match="no exit head for layer 2"):
        heads.weight(2)


def test_errors_are_value_errors():
    assert issubclass(HeadsMismatchError, AdaDecodeError) and issubclass(AdaDecodeError, ValueError)


def test_fingerprint_survives_every_cast():
    """Heads trained on one load of a checkpoint serve its fp32, bf16, fp16 and fp64 loads (the probes are
    cast to the model's dtype): the fingerprint hashes sign bits, which rounding keeps."""
    fp64 = tiny_model("llama")
    prints = {model_fingerprint(tiny_model("llama", dtype=d)) for d in (torch.float32, torch.bfloat16, torch.float16)}
    assert prints == {model_fingerprint(fp64)}
    heads = ExitHeads.identity(tiny_model("llama", dtype=torch.float32), [1])
    assert heads.check(tiny_model("llama", dtype=torch.float16)) is heads


def test_heads_with_the_bf16_sample_digest_still_match(tmp_path):
    """Heads files may carry the digest of the bf16-rounded sample instead; fp32/bf16 loads match it."""
    from adadecode_fx.heads.format import model_fingerprints

    model = tiny_model("llama", dtype=torch.float32)
    digest = model_fingerprints(model)[1]
    assert digest != model_fingerprint(model)
    ExitHeads({1: torch.eye(32)}, digest, 32, 5).save(tmp_path)
    assert ExitHeads.load(tmp_path, tiny_model("llama", dtype=torch.bfloat16)).fingerprint == digest
    with pytest.raises(HeadsMismatchError, match="fingerprint"):
        ExitHeads.load(tmp_path, tiny_model("llama", seed=1))


def test_heads_json_must_be_valid_and_agree(tmp_path):
    model = tiny_model("llama")
    heads = ExitHeads.identity(model, [1, 2])
    heads.metadata["recommended_threshold"] = 0.8
    heads.save(tmp_path)
    path = tmp_path / "heads.json"
    good = path.read_text()
    path.write_text(good[:-20])
    with pytest.raises(HeadsMismatchError, match="heads.json is not valid JSON.*ExitHeads.load.*save"):
        ExitHeads.load(tmp_path, model)
    edited = json.loads(good)
    edited["metadata"]["recommended_threshold"] = 0.5  # a hand edit that loading would ignore
    path.write_text(json.dumps(edited))
    with pytest.raises(HeadsMismatchError, match=r"differs from the metadata in heads.safetensors \(metadata\)"):
        ExitHeads.load(tmp_path, model)
    path.unlink()  # the readable copy is optional
    assert ExitHeads.load(tmp_path, model).recommended()["threshold"] == 0.8
    heads.save(tmp_path)
    assert path.read_text() == good


@pytest.mark.slow
def test_shipped_heads_serve_smollm2_in_fp16():
    from adadecode_fx.heads import find_shipped_heads, shipped_heads
    from tests.conftest import smollm2

    model, _ = smollm2("float16")
    folder = shipped_heads("smollm2-135m")
    assert find_shipped_heads(model) == folder
    assert ExitHeads.load(folder, model).layers == (7, 14, 21)
