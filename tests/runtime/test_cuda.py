"""The CUDA path (skips without a GPU): greedy parity on the device, eager and inductor segments."""
import pytest
import torch

from tests.conftest import cuda_model, decoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _greedy(model, prompt, n):
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox", "gemma2"])
def test_cuda_greedy_parity_many_exits(family):
    model = cuda_model(family, torch.float32)
    dec = decoder(model, [1, 3], threshold=1e-9, scale=0.5, seed=1)
    for plen in (3, 20):
        prompt = list(range(5, 5 + plen))
        out = dec.generate(prompt, max_new_tokens=30)
        assert out.new_tokens == _greedy(model, prompt, 30)
    assert out.stats.early_emitted > 0


def test_cuda_inductor_parity():
    from adadecode_fx import AdaDecodeConfig, AdaDecoder, ExitHeads
    model = cuda_model("llama", torch.float32)
    heads = ExitHeads.random(model, [1, 3], scale=0.5, seed=1)
    dec = AdaDecoder(model, heads, AdaDecodeConfig(threshold=0.05, backend="inductor"))
    prompt = list(range(7, 30))
    assert dec.generate(prompt, max_new_tokens=30).new_tokens == _greedy(model, prompt, 30)


def test_cuda_oracle_bound_reads_hidden_states_on_the_device():
    """The bench's oracle bound replays the reference through the program; its K/V must live with the weights
    (an H100 Qwen bench once failed here with 'index is on cpu')."""
    from adadecode_fx.bench.report import oracle_bound
    model = cuda_model("llama", torch.float32)
    dec = decoder(model, [1, 3], threshold=1e-9, scale=0.5, seed=1)
    prompt = list(range(5, 15))
    ref = _greedy(model, prompt, 12)
    per_prompt = [{"prompt_ids": prompt, "reference_ids": ref, "prompt_tokens": len(prompt)}]
    bound = oracle_bound(dec, dec.heads, per_prompt, [1, 3], 1e-9, 5)
    assert "error" not in bound and bound["oracle_speedup_bound"] >= 1.0


def test_cuda_probe_cost_builds_its_kv_on_the_device():
    """measure_probe_cost (the oracle bound's probe term) had the same CPU-only K/V as the oracle replay."""
    from adadecode_fx.heads.evaluation import measure_probe_cost
    model = cuda_model("llama", torch.float32)
    dec = decoder(model, [1, 3], threshold=1e-9, scale=0.5, seed=1)
    assert measure_probe_cost(dec.program, dec.heads, repeats=3) > 0
