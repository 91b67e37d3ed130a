"""Inductor lowering: shared layer templates, parity with eager AdaDecode and HF greedy, and no
recompilation once warmed up (dynamo's counters)."""
import pytest
import torch
from torch._dynamo.utils import counters

from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
from adadecode_fx.heads import shipped_heads
from adadecode_fx.lower.inductor import lower_inductor, structure_key
from adadecode_fx.runtime import DecodeProgram

from tests.conftest import hf_greedy, smollm2_parity, tiny_model


# gemma2 alternates sliding-window and global layers, but the masks are built in the prologue and
# passed in, so its layers are one graph too
@pytest.mark.parametrize("family,templates", [("llama", 1), ("gemma2", 1), ("gpt_neox", 1)])
def test_identical_layers_share_one_compiled_template(family, templates):
    model = tiny_model(family, dtype=torch.float32)
    eager = AdaDecoder(model, None, AdaDecodeConfig())
    keys = {structure_key(f) for f in eager.program.layer_fns}
    assert len(keys) == templates
    program = lower_inductor(DecodeProgram(eager.gm), AdaDecodeConfig())  # compiles lazily: nothing runs
    assert program.lowering["compiled_templates"] == templates + 2
    assert len({id(f.compiled) for f in program.layer_fns}) == templates


def _unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_inductor_matches_eager_and_hf_with_exits_and_rollbacks_without_recompiling():
    model = tiny_model("llama", dtype=torch.float32)
    heads = ExitHeads.random(model, (1, 3), seed=0)
    config = dict(threshold=0.02, max_pending=3)
    compiled = AdaDecoder(model, heads, AdaDecodeConfig(backend="inductor", **config))  # warms up
    eager = AdaDecoder(model, heads, AdaDecodeConfig(**config))
    before = _unique_graphs()
    early = rejected = 0
    for prompt in ([5, 6, 7], [1], list(range(20, 45))):
        out = compiled.generate(prompt, 30, eos_token_id=None)
        assert out.new_tokens == eager.generate(prompt, 30, eos_token_id=None).new_tokens
        assert out.new_tokens == hf_greedy(model, prompt, 30)
        early += out.stats.early_emitted
        rejected += out.stats.rejected
    assert _unique_graphs() == before, "a generation recompiled after warm-up"
    assert early >= 20 and rejected >= 10, (early, rejected)


def test_inductor_batches_match_hf_and_compile_once_for_every_batch_size():
    model = tiny_model("qwen2", dtype=torch.float32)
    heads = ExitHeads.random(model, (1, 3), seed=1)
    compiled = AdaDecoder(model, heads, AdaDecodeConfig(backend="inductor", threshold=0.02, max_pending=3))
    prompts = [[5, 6, 7], list(range(20, 33)), [1], list(range(40, 48))]
    out = compiled.generate(prompts[:2], 20, eos_token_id=None)  # first batch: warms the batch classes
    assert out.new_tokens == [hf_greedy(model, p, 20) for p in prompts[:2]]
    before = _unique_graphs()
    for batch in (prompts, prompts[1:], prompts[:2]):
        out = compiled.generate(batch, 20, eos_token_id=None)
        assert out.new_tokens == [hf_greedy(model, p, 20) for p in batch]
    assert _unique_graphs() == before, "a batch of another size recompiled"


@pytest.mark.slow
def test_inductor_parity_on_smollm2(smol):
    model, tokenizer = smol
    heads = ExitHeads.load(shipped_heads("smollm2-135m"), model)
    layers = tuple(heads.metadata["recommended_exit_layers"])
    config = dict(exit_layers=layers, threshold=0.5)
    compiled = AdaDecoder(model, heads, AdaDecodeConfig(backend="inductor", **config))
    eager = AdaDecoder(model, heads, AdaDecodeConfig(**config))
    before = _unique_graphs()
    early = sum(s.early_emitted for s in smollm2_parity(tokenizer, compiled, eager, model))
    assert _unique_graphs() == before
    assert early > 0
