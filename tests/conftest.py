"""Shared fixtures: tiny random decoders of several families (fast) and the real SmolLM2 (slow)."""
from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads

_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
               num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False)

FAMILIES = {
    "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, **_COMMON),
    "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, **_COMMON),
    "mistral": lambda: tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **_COMMON),
    "qwen3": lambda: tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **_COMMON),
    "phi3": lambda: tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **_COMMON),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_COMMON),
    "gemma2": lambda: tf.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=6, **_COMMON),
    # per-layer inputs: every layer reads a prologue value computed from the token ids themselves
    "gemma4": lambda: tf.Gemma4TextConfig(num_key_value_heads=2, head_dim=8, global_head_dim=8, sliding_window=6,
                                          vocab_size_per_layer_input=128, hidden_size_per_layer_input=8,
                                          **_COMMON),
    # and its last 2 layers attend over the K/V of the last earlier layer of their kind (Gemma 4 E2B/E4B)
    "gemma4_shared": lambda: tf.Gemma4TextConfig(
        num_key_value_heads=2, head_dim=8, global_head_dim=8, sliding_window=6, vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=8, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        **_COMMON),
}


@pytest.fixture(autouse=True, scope="session")
def _capture_cache_of_this_session(tmp_path_factory):
    """Captures are cached in a directory of this test session's, not in the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADADECODE_CAPTURE_CACHE", str(tmp_path_factory.mktemp("captures")))
        yield


def cuda_model(family: str, dtype=torch.float32):
    """A tiny model of ``family`` on the GPU, its LM head scaled so greedy choices are clear-cut."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(FAMILIES[family]()).to(dtype).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.to("cuda")


@functools.cache
def tiny_model(family: str, seed: int = 0, dtype=torch.float64):
    """A small random decoder; eos disabled so greedy runs the full length."""
    return random_decoder(FAMILIES[family](), dtype, seed)


def random_decoder(config, dtype=torch.float64, seed: int = 0, sharpen: bool = True):
    """A random causal LM of ``config`` whose greedy choices are clear-cut (``sharpen``), eos disabled."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    if sharpen:  # so argmax ties (float noise) are vanishingly rare
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def save_tiny_model_dir(d, family: str = "llama"):
    """``tiny_model(family)`` saved as an HF folder with a word-level tokenizer: ``w<i>`` is token i, so
    every id the model makes decodes and ``"w5 w17"`` encodes to ``[5, 17]``; anything else is [UNK], the
    last id."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model(family)
    vocab_size = model.config.vocab_size
    model.save_pretrained(d)
    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["[UNK]"] = vocab_size - 1
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # [UNK] pads too: batched generation (train-heads, eval-heads) needs a pad token
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(d)
    return d


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_token_id=None) -> list[int]:
    ids = torch.tensor([prompt])
    kwargs = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def hf_batch_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF greedy on the left-padded batch (pad id 0). In bf16 a padded row rounds unlike the same prompt
    alone (its attention reads the pad slots too), so bf16 batches compare with this."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[:, width:].tolist()


def smollm2_parity(tokenizer, lowered, eager, model, n: int = 24) -> list:
    """Two prompts (code and prose) through ``lowered``: each gives ``eager``'s tokens and HF greedy's.
    Returns the lowered decoder's stats per prompt."""
    stats = []
    for text in ("def fibonacci(n):", "The capital of France is"):
        ids = tokenizer(text).input_ids
        out = lowered.generate(ids, n)
        assert out.new_tokens == eager.generate(ids, n).new_tokens
        x = torch.tensor([ids])
        ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n)
        assert out.new_tokens == ref[0, len(ids):].tolist()
        stats.append(out.stats)
    return stats


@functools.cache
def captured(family: str):
    """capture() of the shared tiny model, once per session for all pass tests (the passes copy the graph
    into new segments and never modify it; test_split_does_not_touch_input_graph checks that)."""
    from adadecode_fx.capture import capture

    return capture(tiny_model(family))


@functools.cache
def smollm2(dtype: str = "float32"):
    from adadecode_fx.zoo import models

    return models.load("smollm2-135m", dtype=dtype)


@pytest.fixture(scope="session")
def smol():
    return smollm2()


def decoder(model, layers, threshold=0.5, max_pending=5, heads=None, seed=0, scale=1.0, kv_bucket=1):
    heads = heads or ExitHeads.random(model, layers, scale=scale, seed=seed)
    return AdaDecoder(model, heads, AdaDecodeConfig(threshold=threshold, max_pending=max_pending, kv_bucket=kv_bucket))


def assert_greedy_with_exits(dec, model, new: int = 20, min_early: int = 20, min_rejected: int = 5) -> None:
    """``dec`` gives HF greedy's tokens on a short and a longer prompt, with at least that many early tokens
    and rejections between them (heads that exit often and are often wrong)."""
    early = rejected = 0
    for prompt in ([5, 6, 7], list(range(20, 45))):
        out = dec.generate(prompt, new, eos_token_id=None)
        assert out.new_tokens == hf_greedy(model, prompt, new)
        early, rejected = early + out.stats.early_emitted, rejected + out.stats.rejected
    assert early >= min_early and rejected >= min_rejected


def bench_script(name: str):
    """A script of bench/ imported as a module (they are not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
