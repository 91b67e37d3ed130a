"""Readouts written chunk by chunk into tensors made up front equal one pass over all positions."""
import torch

from adadecode_fx import ExitHeads
from adadecode_fx.build import structural_graph
from adadecode_fx.heads.readout import agreement, collect_hidden, final_argmax
from adadecode_fx.runtime.program import DecodeProgram
from tests.conftest import tiny_model


def test_chunked_readouts_equal_one_pass():
    model = tiny_model("llama", seed=2, dtype=torch.float32)
    program = DecodeProgram(structural_graph(model))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (9, 14)]
    hidden, final = collect_hidden(program, seqs, (1, 2), program.gm.meta["kv_shapes"], torch.float32)
    whole = program.epilogue(final[None])[0].argmax(-1)
    assert torch.equal(final_argmax(program, final, chunk=5), whole)  # 23 positions: a short last chunk
    heads = ExitHeads.random(model, [1, 2], scale=0.5, seed=1)
    heads.vocab = torch.arange(0, 128, 3)
    small, target = agreement(program, heads, hidden, final, chunk=4)
    big, _ = agreement(program, heads, hidden, final, chunk=1000)
    assert torch.equal(target, whole)
    for l in (1, 2):
        assert torch.equal(small[l]["token"], big[l]["token"]) and torch.allclose(small[l]["conf"], big[l]["conf"])
        assert torch.equal(small[l]["agree"], big[l]["token"] == whole) and small[l]["token"].shape == (23,)
