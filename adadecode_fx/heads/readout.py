"""What the exit probes see: hidden states read from a decoding program, and how often a head agrees
with the final layer. Shared by training (the targets) and evaluation (the records)."""
from __future__ import annotations

import itertools

import torch

from ..passes.insert_exit_probes import ExitProbe, shortlist_epilogue
from ..runtime.kv_state import KVState
from ..runtime.program import DecodeProgram
from .format import ExitHeads


def epilogue_weight(program: DecodeProgram) -> torch.Tensor | None:
    """A weight of the program's epilogue: its device and dtype are the program's."""
    return next(itertools.chain(program.epilogue_fn.parameters(), program.epilogue_fn.buffers()), None)


def segment_device(program: DecodeProgram) -> torch.device:
    """Where the program's weights live (its K/V and inputs must be there too); CPU if it holds none."""
    weight = epilogue_weight(program)
    return weight.device if weight is not None else torch.device("cpu")


@torch.no_grad()
def collect_hidden(program: DecodeProgram, seqs: list[list[int]], layers, kv_shapes, dtype, progress: bool = False):
    """Stack exit-layer and final-layer hidden states of all sequences: ({l: [N, d]}, [N, d])."""
    from tqdm.auto import tqdm

    per_layer = {l: [] for l in layers}
    final = []
    device = segment_device(program)
    bar = tqdm(total=sum(map(len, seqs)), desc="hidden states", unit="tok", unit_scale=True, disable=not progress)
    for ids in seqs:
        state = KVState(kv_shapes, len(ids), dtype, device, 64, sources=program.kv_sources)
        keep, last = program.hidden_states(ids, set(layers), state)
        for l in layers:
            per_layer[l].append(keep[l][0])
        final.append(last[0])
        bar.update(len(ids))
    bar.close()
    # one layer at a time, dropping its pieces: the peak is the result plus one layer, not twice it
    return {l: torch.cat(per_layer.pop(l)) for l in list(layers)}, torch.cat(final)


@torch.no_grad()
def final_argmax(program: DecodeProgram, final: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    # written into one tensor made up front: a small result kept per chunk would land in the hole each
    # chunk's logits leave, so glibc could not reuse it and the heap grew by a chunk's logits every step
    # (SmolLM2, 256 x 49,152 bf16: 25 MB a chunk, 20 GB over 200k tokens; docs/heads.md)
    out = torch.empty(len(final), dtype=torch.long, device=final.device)
    for i in range(0, len(final), chunk):
        torch.argmax(program.epilogue(final[i:i + chunk][None])[0], dim=-1, out=out[i:i + chunk])
    return out


@torch.no_grad()
def agreement(program: DecodeProgram, heads: ExitHeads, hidden: dict, final: torch.Tensor, chunk: int = 256,
              layers=None):
    """Per layer of ``layers`` (default: the heads'): the probe's token and confidence (shortlist included,
    as at decode time) and whether it equals the final argmax, for every token. The last layer's hidden
    state is ``final``; its probe is the model's own head over the shortlist (`ExitHeads.weight`)."""
    head = program.epilogue_fn
    if heads.vocab is not None:
        head = shortlist_epilogue(head, heads.vocab, program.gm.meta["vocab_size"])
    result = {}
    target = final_argmax(program, final, chunk)
    last = program.num_layers - 1
    hidden = {**hidden, last: final}
    for l in (heads.layers if layers is None else layers):
        dev = hidden[l].device
        vocab = None if heads.vocab is None else heads.vocab.to(dev)
        probe = ExitProbe(heads.weight(l).to(device=dev, dtype=hidden[l].dtype), head, vocab)
        tok, conf = None, None
        for i in range(0, len(final), chunk):  # into tensors made once, as in `final_argmax`
            t, c = probe(hidden[l][i:i + chunk][None])
            if tok is None:
                tok = torch.empty(len(final), dtype=t.dtype, device=t.device)
                conf = torch.empty(len(final), dtype=c.dtype, device=c.device)
            tok[i:i + chunk], conf[i:i + chunk] = t[0], c[0]
        result[l] = {"token": tok, "conf": conf, "agree": tok == target}
    return result, target
