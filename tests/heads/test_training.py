"""A tiny self-distillation run lowers the KL and raises agreement on held-out tokens; it resumes."""
import pytest
import torch

from adadecode_fx import ExitHeads
from adadecode_fx.build import structural_graph
from adadecode_fx.runtime.program import DecodeProgram
from adadecode_fx.heads.readout import agreement, collect_hidden
from adadecode_fx.heads.training import TrainConfig, distillation_sequences, train_heads
from tests.conftest import tiny_model


def _prompts(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (12,), generator=g).tolist() for _ in range(n)]


def _held_out_agreement(model, heads):
    program = DecodeProgram(structural_graph(model))
    seqs = distillation_sequences(model, None, _prompts(99, 6), 24, 1)
    hidden, final = collect_hidden(program, seqs, heads.layers, program.gm.meta["kv_shapes"], torch.float32)
    res, _ = agreement(program, heads, hidden, final)
    return {l: r["agree"].float().mean().item() for l, r in res.items()}


@pytest.mark.parametrize("shortlist", [0, 64])  # 0: full-vocabulary loss; 64: the loss over the shortlist
def test_training_lowers_kl_and_raises_agreement(tmp_path, shortlist):
    model = tiny_model("llama", seed=3, dtype=torch.float32)
    cfg = TrainConfig(layers=(1, 2), epochs=4, lr=2e-2, gen_tokens=24, batch_tokens=64, shortlist=shortlist)
    heads = train_heads(model, None, _prompts(0, 24), cfg, tmp_path, progress=False)
    curve = [loss for _, loss in heads.metadata["loss_curve"]]
    assert sum(curve[-3:]) / 3 < 0.7 * sum(curve[:3]) / 3, curve
    before = _held_out_agreement(model, ExitHeads.identity(model, [1, 2]))
    after = _held_out_agreement(model, heads)
    assert all(after[l] > before[l] + 0.05 for l in (1, 2)), (before, after)
    loaded = ExitHeads.load(tmp_path, model)
    assert loaded.metadata["train"]["layers"] == [1, 2] and loaded.metadata["complete"]
    assert (loaded.vocab is None) == (shortlist == 0)
    assert ("shortlist" in loaded.metadata["method"]) == (shortlist > 0)


def test_training_resumes_from_its_state(tmp_path):
    model = tiny_model("llama", seed=3, dtype=torch.float32)
    cfg = TrainConfig(layers=(1,), epochs=1, gen_tokens=8, batch_tokens=64, shortlist=32)
    first = train_heads(model, None, _prompts(1, 8), cfg, tmp_path, progress=False)
    steps = first.metadata["steps"]
    cfg2 = TrainConfig(layers=(1,), epochs=2, gen_tokens=8, batch_tokens=64, shortlist=32)
    second = train_heads(model, None, _prompts(1, 8), cfg2, tmp_path, progress=False)
    assert second.metadata["steps"] == 2 * steps  # picked up where the first run stopped
    assert first.vocab is not None and len(first.vocab) <= 32


def test_bf16_training_moves_the_heads(tmp_path):
    # in bf16 the epilogue's linears may be the block_linear kernel: its gradients must reach the adapters
    model = tiny_model("llama", seed=3, dtype=torch.bfloat16)
    cfg = TrainConfig(layers=(1,), epochs=2, lr=2e-2, gen_tokens=16, batch_tokens=64, shortlist=0)
    heads = train_heads(model, None, _prompts(2, 12), cfg, tmp_path, progress=False)
    assert not torch.equal(heads.weight(1).float(), torch.eye(heads.weight(1).shape[0]))


def test_an_epilogue_without_gradients_is_an_error_not_identity_heads(tmp_path, monkeypatch):
    from adadecode_fx.errors import AdaDecodeError
    from adadecode_fx.heads import training

    real, leaf = training.loss_head, torch.zeros((), requires_grad=True)
    # what an op without a backward does: the loss still has a graph, but nothing flows to the adapters
    monkeypatch.setattr(training, "loss_head", lambda program, vocab: (lambda x: real(program, vocab)(x.detach()) + leaf))
    model = tiny_model("llama", seed=3, dtype=torch.float32)
    cfg = TrainConfig(layers=(1, 2), epochs=1, gen_tokens=8, batch_tokens=64, shortlist=0)
    with pytest.raises(AdaDecodeError, match=r"no gradient reaches the heads of layers \[1, 2\]"):
        train_heads(model, None, _prompts(1, 4), cfg, tmp_path, progress=False)


def test_continuations_are_reused_per_prompt_when_a_source_is_added(tmp_path, monkeypatch):
    from adadecode_fx.heads import training

    model = tiny_model("llama", seed=3, dtype=torch.float32)
    cfg = TrainConfig(layers=(1,), epochs=1, gen_tokens=8, batch_tokens=64, shortlist=32)
    first, extra = _prompts(4, 6), _prompts(5, 3)
    train_heads(model, None, first, cfg, tmp_path / "a", progress=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / training.SEQS_FILE).write_bytes((tmp_path / "a" / training.SEQS_FILE).read_bytes())
    generated = []
    real = training.distillation_sequences
    monkeypatch.setattr(training, "distillation_sequences",
                        lambda m, t, prompts, *a: generated.extend(prompts) or real(m, t, prompts, *a))
    heads = train_heads(model, None, extra[:1] + first + extra[1:], cfg, tmp_path / "b", progress=False)
    assert generated == extra  # only the new prompts were generated
    assert heads.metadata["training_data"]["continuations"]["sequences"] == 9
    longer = TrainConfig(layers=(1,), epochs=1, gen_tokens=10, batch_tokens=64, shortlist=32)
    generated.clear()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / training.SEQS_FILE).write_bytes((tmp_path / "b" / training.SEQS_FILE).read_bytes())
    train_heads(model, None, first, longer, tmp_path / "c", progress=False)
    assert generated == first  # another continuation length reuses nothing
