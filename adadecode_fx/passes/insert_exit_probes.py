"""insert_exit_probes: add an exit probe after each configured exit layer.

Expects: the output of `deferred_batching`, and settings with ``exit_layers`` and ``heads`` (an
`ExitHeads` holding one d x d adapter per exit layer).
Returns: the same module with submodules ``exit_probe_{l}`` = adapter -> the model's own epilogue
(final norm + LM head, shared weights) -> (token, confidence), where confidence is the max softmax
probability. The top-level graph calls each probe on the last row of layer ``l``'s output and appends
its outputs after the model's logits, so the full-depth logits are unchanged.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..errors import UnsupportedModelError
from .split_layers import copy_graph, segment_calls
from .settings import PassSettings


class ExitProbe(nn.Module):
    """adapter -> epilogue -> (argmax token, max probability) for hidden rows ``[1, t, d]``.

    With a ``vocab`` shortlist the epilogue computes only those rows of the LM head (a full-vocabulary
    head costs as much as several decoder layers on small models); the confidence is then the softmax
    over the shortlist. Verification keeps the output exact whatever the probe says.
    """

    def __init__(self, adapter: torch.Tensor, epilogue: nn.Module, vocab: torch.Tensor | None = None,
                 linear=None):
        super().__init__()
        self.adapter = nn.Parameter(adapter, requires_grad=False)
        self.epilogue = epilogue
        self.register_buffer("vocab", vocab, persistent=False)
        self.linear = linear  # ``(x, weight, bias) -> x @ weight.T`` for the adapter; None: torch.matmul

    def forward(self, hidden):
        return self.apply(self.epilogue, self.vocab, self.adapter, hidden, self.linear)

    def head_logits(self, hidden):
        """The head's logits ``[..., len(vocab)]`` over its shortlist (the whole vocabulary without one)."""
        return self.epilogue(torch.matmul(hidden, self.adapter.t()))[0]

    def logits(self, hidden, vocab_size: int):
        """The head's logits over the full vocabulary, ``-inf`` outside the shortlist (for sampling: the
        probe's distribution is what the logits processors make of these)."""
        logits = self.head_logits(hidden)
        if self.vocab is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
        return full.index_copy_(-1, self.vocab.to(logits.device), logits)

    @staticmethod
    def apply(epilogue, vocab, adapter, hidden, linear=None):
        """The probe as a function of its adapter: every exit layer shares one compiled copy of it."""
        adapted = torch.matmul(hidden, adapter.t()) if linear is None else linear(hidden, adapter, None)
        logits = epilogue(adapted)[0]
        conf, token = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        if vocab is not None:
            token = vocab[token]
        return token, conf


def shortlist_epilogue(epilogue: fx.GraphModule, vocab: torch.Tensor, vocab_size: int) -> fx.GraphModule:
    """A copy of the epilogue whose LM head (the weight with ``vocab_size`` rows, and its bias) keeps only
    the rows in ``vocab``: logits come out as ``[..., len(vocab)]``. Found from the graph, not by name."""
    graph = copy_graph(epilogue.graph)
    root = nn.Module()
    found = 0
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr(epilogue, node.target)
        if isinstance(value, torch.Tensor) and value.dim() in (1, 2) and value.shape[0] == vocab_size:
            value = value.detach().index_select(0, vocab.to(value.device)).contiguous()
            found += value.dim() == 2
        if isinstance(value, nn.Parameter):
            value = value.detach()
        root.register_buffer(node.target, value, persistent=False)
    if found != 1:
        raise UnsupportedModelError(f"could not find a unique LM head weight ({vocab_size} rows) in the epilogue")
    for node in graph.nodes:
        if "val" in node.meta:
            del node.meta["val"]  # shapes changed along the vocabulary dimension
    return fx.GraphModule(root, graph)


def insert_exit_probes(gm: fx.GraphModule, settings: PassSettings) -> fx.GraphModule:
    layers = tuple(settings.exit_layers)
    if not layers:
        gm.meta["exit_layers"] = ()
        return gm
    heads = settings.heads
    if heads is None:
        raise UnsupportedModelError("insert_exit_probes needs heads (ExitHeads) for the exit layers")
    calls = segment_calls(gm)
    epilogue = gm.epilogue
    if len([n for n in epilogue.graph.nodes if n.op == "placeholder"]) != 1:
        raise UnsupportedModelError("the epilogue takes more than the final hidden state; cannot reuse it as a probe head")
    vocab = getattr(heads, "vocab", None)
    param = next(iter(epilogue.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    if vocab is not None:
        vocab = vocab.to(device)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    probe_head = epilogue
    if vocab is not None:
        probe_head = shortlist_epilogue(epilogue, vocab, gm.meta["vocab_size"])
    extra = []
    for layer in layers:
        call = calls[f"layer_{layer}"]
        residual = next(u for u in call.users if u.target is operator.getitem and u.args[1] == 0)
        name = f"exit_probe_{layer}"
        gm.add_module(name, ExitProbe(heads.weight(layer).to(device=device, dtype=dtype), probe_head, vocab))
        with gm.graph.inserting_after(residual):
            last = gm.graph.call_function(torch.ops.aten.slice.Tensor, (residual, 1, -1))
        with gm.graph.inserting_after(last):
            probe = gm.graph.call_module(name, (last,))
        with gm.graph.inserting_after(probe):
            tok = gm.graph.call_function(operator.getitem, (probe, 0))
        with gm.graph.inserting_after(tok):
            conf = gm.graph.call_function(operator.getitem, (probe, 1))
        extra += [tok, conf]
    original = out_node.args[0]
    original = tuple(original) if isinstance(original, (tuple, list)) else (original,)
    out_node.args = (original + tuple(extra),)
    gm.meta["exit_layers"] = layers
    gm.meta["num_model_outputs"] = len(original)
    gm.recompile()
    return gm
