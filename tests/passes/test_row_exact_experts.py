"""row_exact_experts: a mixture-of-experts layer multiplies a block of decode rows as each row alone, so
bf16 MoE decoding with exits stays bit-identical to plain greedy; MoE layers split into segments at all
(their routed-row count is a size the next layer now derives itself)."""
import pytest
import torch
import transformers as tf

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.ops.attention import prefill_block
from adadecode_fx.ops.experts import GROUPED_MM, ROW_EXACT_GROUPED, fallback_op, plain_experts, row_exact_grouped
from tests.conftest import assert_greedy_with_exits, hf_greedy, random_decoder


def _groups(seed=0, K=64, N=48, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, K, N, generator=g).to(dtype)
    x = torch.randn(7, K, generator=g).to(dtype)
    offs = torch.tensor([2, 2, 6, 7], dtype=torch.int32)  # experts 0: rows 0-1, 2: rows 2-5, 3: row 6
    return x, weight, offs, [0, 0, 2, 2, 2, 2, 3]


@pytest.mark.parametrize("fallback", [False, True])
def test_each_row_is_multiplied_by_its_expert_alone(fallback):
    x, weight, offs, experts = _groups()
    out = row_exact_grouped(x, weight, offs, fallback)
    one = offs.new_ones(1)
    for r, e in enumerate(experts):  # what one-position decoding computes for that row
        assert torch.equal(out[r:r + 1], GROUPED_MM(x[r:r + 1], weight[e:e + 1], one))
        assert torch.equal(out[r:r + 1], x[r:r + 1] @ weight[e])
    op = fallback_op() if fallback else GROUPED_MM
    with prefill_block():  # a prompt: the grouped call, as HF makes it
        assert torch.equal(row_exact_grouped(x, weight, offs, fallback), op(x, weight, offs))
    single = torch.tensor([1, 1, 2, 2], dtype=torch.int32)  # one position's rows: one per expert, one call
    assert torch.equal(row_exact_grouped(x[[0, 2]], weight, single, fallback), op(x[[0, 2]], weight, single))


_TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=False)
MOE = {  # (config, dtype): MoE kernels take no float64
    "mixtral": lambda: tf.MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **_TINY),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                           num_experts_per_tok=2, shared_expert_intermediate_size=32, **_TINY),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layers_split_and_their_grouped_matmuls_are_rewritten(dtype):
    model = random_decoder(MOE["mixtral"](), dtype)
    dec = AdaDecoder(model, ExitHeads.random(model, (1,), seed=1), AdaDecodeConfig(threshold=0.5))
    gm = dec.program.gm
    for i in range(gm.meta["num_layers"]):
        layer = getattr(gm, f"layer_{i}")
        inputs = [n for n in layer.graph.nodes if n.op == "placeholder"]
        assert not any(isinstance(n.meta.get("val"), torch.SymInt) for n in inputs)  # sizes derived inside
        assert len(next(n for n in layer.graph.nodes if n.op == "output").args[0]) == 1  # the residual only
        rewritten = [n for n in layer.graph.nodes if n.target is ROW_EXACT_GROUPED]
        assert len(rewritten) == 2  # gate/up and down projections
        # fp32 on a CPU goes through transformers' fallback, bf16 through ATen's grouped matmul
        assert all(n.args[3] is (dtype == torch.float32) for n in rewritten)
    graph = plain_experts(gm.layer_0.graph)
    assert {n.target for n in graph.nodes} & {GROUPED_MM, fallback_op()}


@pytest.mark.parametrize("family", sorted(MOE))
@pytest.mark.parametrize("backend", ["eager", "cudagraphs"])
def test_moe_greedy_parity_with_many_exits_and_rejections(family, backend):
    model = random_decoder(MOE[family](), torch.float32)
    dec = AdaDecoder(model, ExitHeads.random(model, (0, 2), scale=0.5, seed=1),
                     AdaDecodeConfig(backend=backend, threshold=0.02, max_pending=3))
    assert_greedy_with_exits(dec, model)


def test_bf16_moe_with_exits_equals_plain_greedy_bit_for_bit():
    """At these widths a block's grouped matmul rounds differently from one row's on the CPU this was
    written on (without the pass the tokens part at new token 29, on a 1-ulp logit tie)."""
    model = random_decoder(tf.Qwen3MoeConfig(vocab_size=512, hidden_size=256, intermediate_size=1024,
                                         moe_intermediate_size=3072, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=64, num_experts=4, num_experts_per_tok=2,
                                         tie_word_embeddings=False), torch.bfloat16)
    prompt = [5, 6, 7]
    dec = AdaDecoder(model, ExitHeads.random(model, (0, 2), scale=0.5, seed=1),
                     AdaDecodeConfig(threshold=0.02, max_pending=2))
    out = dec.generate(prompt, 40, eos_token_id=None)
    assert out.new_tokens == hf_greedy(model, prompt, 40)
    assert out.stats.early_emitted >= 20 and out.stats.rejected >= 5


def test_cudagraphs_refuses_to_capture_the_float32_expert_fallback_on_a_gpu():
    """In float32 the experts run transformers' fallback, which reads the group sizes back to the host: a
    CUDA graph cannot capture that, so the lowering says so before allocating anything on the device."""
    from adadecode_fx.build import structural_graph
    from adadecode_fx.errors import AdaDecodeError
    from adadecode_fx.lower.cudagraphs import lower_cudagraphs
    from adadecode_fx.lower.static_segments import host_reading_layers, static_segment
    from adadecode_fx.runtime import DecodeProgram

    model = random_decoder(MOE["mixtral"](), torch.float32)
    program = DecodeProgram(structural_graph(model)).replace(model=model, vocab_size=128, dtype=torch.float32)
    static = program.replace(layer_fns=[static_segment(f) for f in program.layer_fns])
    assert host_reading_layers(static) == [f"layer_{i}" for i in range(4)]
    with pytest.raises(AdaDecodeError, match="cannot capture layer_0 .*bfloat16.*backend='eager'"):
        lower_cudagraphs(program.replace(device=torch.device("cuda")), AdaDecodeConfig(backend="cudagraphs"))
    bf16 = random_decoder(MOE["mixtral"](), torch.bfloat16)  # ATen's grouped matmul: nothing read back
    program = DecodeProgram(structural_graph(bf16))
    assert host_reading_layers(program.replace(layer_fns=[static_segment(f) for f in program.layer_fns])) == []
