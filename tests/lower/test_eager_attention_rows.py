"""Eager attention (``q @ k^T -> softmax -> P @ V`` in the layer graph) per batch row from its first real
key: each row of a left-padded bf16 batch equals the row alone, where reading the masked pads first
does not (`adadecode_fx.lower.eager_attention_rows`)."""
import torch
import transformers as tf
from torch import fx

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.build import build_program
from adadecode_fx.lower.eager_attention_rows import PerRowAttention, eager_attention_rows
from tests.conftest import hf_greedy, random_decoder, tiny_model

MIN = torch.finfo(torch.bfloat16).min


def _gemma2_attention(q, k_t, v, mask):  # the shape of HF's eager attention with soft-capping
    w = torch.tanh(torch.matmul(q, k_t) * 0.125 / 50.0) * 50.0 + mask
    return torch.matmul(torch.softmax(w, -1, dtype=torch.float32).to(q.dtype), v)


def _rewritten(decoder) -> list[int]:
    """Per layer, how many `PerRowAttention` calls the eager lowering put in it."""
    return [sum(isinstance(m, PerRowAttention) for m in getattr(fn, "gm", fn).children())
            for fn in decoder.program.layer_fns]


def test_each_row_attends_as_alone_where_leading_pads_part():
    torch.manual_seed(0)
    per_row = PerRowAttention(fx.symbolic_trace(_gemma2_attention))
    B, H, d, parted = 2, 8, 128, 0
    for _ in range(300):  # leading pads part a row from alone rarely (2 of these 600 rows, CPU-512)
        own = [int(n) for n in torch.randint(3, 200, (B,))]
        S = max(own) + 40
        pads = [S - n for n in own]
        k = torch.randn(B, H, S, d, dtype=torch.bfloat16)
        v = torch.randn(B, H, S, d, dtype=torch.bfloat16)
        q = torch.randn(B, H, 1, d, dtype=torch.bfloat16)
        mask = torch.zeros(B, 1, 1, S, dtype=torch.bfloat16)
        for b, p in enumerate(pads):
            mask[b, ..., :p] = MIN
        out = per_row(q, k.transpose(2, 3), v, mask)
        batched = _gemma2_attention(q, k.transpose(2, 3), v, mask)
        for b, p in enumerate(pads):
            alone = _gemma2_attention(q[b:b + 1], k[b:b + 1, :, p:].transpose(2, 3), v[b:b + 1, :, p:],
                                      mask[b:b + 1, ..., p:])
            assert torch.equal(out[b:b + 1], alone)
            parted += not torch.equal(batched[b:b + 1], alone)
    assert parted > 0  # the masked pads before a row's keys do round differently: the test can fail


def test_a_padded_gemma2_batch_decodes_every_row_as_alone():
    """Without the rewrite, the row with 21 pads parts from alone at token 37 (bf16, CPU-512), at full depth
    and with exits; HF's own batch parts there too."""
    from tests.runtime.test_sliding_windows import _WIDE, prompts

    cfg = tf.Gemma2Config(head_dim=64, **dict(_WIDE, hidden_size=256, intermediate_size=512))
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(torch.bfloat16).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    rows = [p + p + p for p in prompts(4, seed=2)]
    alone = [hf_greedy(model, r, 40) for r in rows]
    heads = ExitHeads.random(model, (0, 2), scale=0.5, seed=3)
    for decoder in (AdaDecoder(model), AdaDecoder(model, heads, AdaDecodeConfig(threshold=1e-9, max_pending=3))):
        assert _rewritten(decoder) == [1] * cfg.num_hidden_layers
        out = decoder.generate(rows, 40, pad_token_id=0, eos_token_id=None)
        assert out.new_tokens == alone
    assert out.stats.early_emitted > 0 and out.stats.rejected > 0


def test_llama_with_eager_attention_gets_the_rewrite_and_decodes_a_batch_as_alone():
    cfg = tf.LlamaConfig(num_key_value_heads=2, vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    model = random_decoder(cfg, torch.bfloat16, seed=2)
    decoder = AdaDecoder(model, ExitHeads.random(model, (1, 2), seed=3), AdaDecodeConfig(threshold=0.005))
    assert all(_rewritten(decoder))
    rows = [list(range(5, 9)), list(range(20, 45)), list(range(60, 73))]
    out = decoder.generate(rows, max_new_tokens=24, eos_token_id=None)
    assert out.new_tokens == [hf_greedy(model, r, 24) for r in rows] and out.stats.early_emitted > 0


def test_an_unpadded_region_and_other_graphs_are_left_alone():
    model = tiny_model("llama", dtype=torch.float32)  # SDPA: no softmax in its layers
    program = build_program(model, None, AdaDecodeConfig())
    for fn in program.layer_fns:
        assert not eager_attention_rows(fn)


def test_gpt_oss_sinks_and_the_unused_max_indices_go_with_the_region():
    """GPT-OSS appends per-head sink logits to the scores and subtracts ``max(...).values``: the unused
    ``.indices`` must not stop the rewrite, and the sinks (at the keys' end) stay whole for every row."""
    cfg = tf.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=256, sliding_window=4096,
                          layer_types=["full_attention"] * 2)
    model = random_decoder(cfg, torch.bfloat16, seed=0)
    decoder = AdaDecoder(model, ExitHeads.random(model, (0,), seed=3), AdaDecodeConfig(threshold=0.005))
    assert all(_rewritten(decoder))
    rows = [list(range(5, 9)), list(range(20, 45)), list(range(60, 73))]
    out = decoder.generate(rows, max_new_tokens=16, eos_token_id=None)
    assert out.new_tokens == [hf_greedy(model, r, 16) for r in rows] and out.stats.early_emitted > 0
