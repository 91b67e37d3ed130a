"""bf16 parity: deferred blocks round exactly like one-row decoding (row_exact_attention + block_linear).

Random heads at a low threshold make almost every token exit early, so most positions reach the deep
layers inside blocks of several rows; in bf16 that used to flip near-ties (docs/notes.md). A padded
batch's rows decode as their prompts alone."""
import functools

import pytest
import torch
import transformers as tf

from tests.conftest import decoder, hf_batch_greedy, hf_greedy

_BIG = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


@functools.cache
def bf16_model(family: str, dtype=torch.bfloat16):
    torch.manual_seed(1)
    config = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family](**_BIG)
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


@pytest.mark.parametrize("family,dtype", [("llama", torch.bfloat16), ("qwen2", torch.bfloat16),
                                          ("llama", torch.float16)])
def test_bf16_greedy_parity_with_many_blocks(family, dtype):
    """fp16 too: no block kernel takes it, so its blocks' linears run one row at a time."""
    model = bf16_model(family, dtype)
    dec = decoder(model, [0, 2], threshold=1e-9, max_pending=5, scale=0.5, seed=3)
    g = torch.Generator().manual_seed(0)
    early = 0
    for plen in (5, 17, 40):
        prompt = torch.randint(1, 512, (plen,), generator=g).tolist()
        out = dec.generate(prompt, max_new_tokens=48)
        assert out.new_tokens == hf_greedy(model, prompt, 48), f"prompt length {plen}"
        early += out.stats.early_emitted
    assert early > 48  # the test is only meaningful if many tokens went through blocks


def test_bf16_padded_batch_rows_decode_as_each_prompt_alone():
    """Each row of a padded bf16 batch gives the tokens of its prompt decoded alone, with many exits and
    blocks. HF's own padded batch does not: its rows read the pad slots and round by the batch size."""
    model = bf16_model("qwen2")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (3, 11, 26, 7)]
    out = decoder(model, [0, 2], threshold=1e-9, max_pending=3, scale=0.5, seed=3).generate(prompts, 32, pad_token_id=0)
    alone = [hf_greedy(model, p, 32) for p in prompts]
    assert out.new_tokens == alone
    assert out.stats.early_emitted > 20
    assert hf_batch_greedy(model, prompts, 32) != alone  # the test can fail: a batch is not alone by itself
