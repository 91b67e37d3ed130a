"""Eager attention per batch row: a layer's ``matmul -> softmax -> matmul`` attends from each row's first
real key, as the row's prompt decoded alone does.

Why: models that compute attention themselves (Gemma 2's soft-capping, GPT-OSS's sinks,
``attn_implementation="eager"``) do not reach the SDPA op that `row_exact_attention` rewrites. In a
left-padded batch their rows read the masked pad slots *before* their own keys, which shifts how the
softmax and ``P @ V`` sums line up and rounds differently in bf16 (a tiny Gemma 2: 1 of 12 rows parted
from alone; docs/notes.md, Batching). Masked keys *after* a row's own (a block's causal tail) do not
change its result, which is why one prompt with deferred blocks stays exact without this.

What: the nodes from the scores' matmul (``q @ k^T``) to the output's matmul (``P @ V``) become a
sub-module, `PerRowAttention`, called with the region's inputs. It runs the region unchanged where no
batch row starts after slot 0 (one prompt, an unpadded batch, CUDA: reading the mask back would stall
every layer, and cuBLAS is not row-exact anyway); otherwise once per batch row over its keys from its
first visible one, the key axis of every input that has it (``k^T``, ``V``, the mask) cut there.

Eager lowering only: compiled and exported segments keep the graph (they are not bf16-exact anyway).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..ops.attention import first_keys

_A = torch.ops.aten
_MATMUL = _A.matmul.default
SOFTMAX_OPS = tuple(getattr(_A, name).default if name != "softmax" else _A.softmax.int
                 for name in ("softmax", "_softmax", "_safe_softmax") if hasattr(_A, name))
# between the softmax and P @ V: a cast, dropout (p = 0 in eval), dropping sink columns
_AFTERSOFTMAX_OPS = (_A.to.dtype, _A._to_copy.default, _A.dropout.default, _A.slice.Tensor, _A.type_as.default)


def _output_matmul(softmax: fx.Node) -> fx.Node | None:
    node = softmax
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_function" or not user.args or user.args[0] is not node:
            return None
        if user.target is _MATMUL:
            return user
        if user.target not in _AFTERSOFTMAX_OPS:
            return None
        node = user
    return None


def _scores_matmul(softmax: fx.Node) -> fx.Node | None:
    """The one matmul among the softmax input's ancestors reached without passing another matmul."""
    found, seen, todo = set(), set(), [softmax.args[0]]
    while todo:
        node = todo.pop()
        if not isinstance(node, fx.Node) or node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if node.target is _MATMUL:
            found.add(node)
            continue
        todo.extend(a for a in node.all_input_nodes)
    return found.pop() if len(found) == 1 else None


def _region(scores: fx.Node, out: fx.Node) -> list[fx.Node] | None:
    """Nodes on the paths from ``scores`` to ``out``, in graph order; None if any of them (``out`` apart)
    is also used outside them."""
    order = {n: i for i, n in enumerate(scores.graph.nodes)}
    below = {scores}
    for node in scores.graph.nodes:
        if order[scores] < order[node] <= order[out] and any(a in below for a in node.all_input_nodes):
            below.add(node)
    above, todo = set(), [out]
    while todo:
        node = todo.pop()
        if node in above or node not in below:
            continue
        above.add(node)
        todo.extend(node.all_input_nodes)
    # a tuple's unused part (GPT-OSS's ``max(...).indices``) goes with the region
    above |= {u for n in above for u in n.users if u.target is operator.getitem and not u.users}
    region = sorted(above, key=order.__getitem__)
    if any(u not in above for n in region if n is not out for u in n.users):
        return None
    return region


def _sub_module(region: list[fx.Node], inputs: list[fx.Node], out: fx.Node, owner: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    env = {n: graph.placeholder(f"in_{i}") for i, n in enumerate(inputs)}
    for node in region:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[out])
    return fx.GraphModule(owner, graph)


class PerRowAttention(torch.nn.Module):
    """``region(q, k_t, v, *rest)`` (``k_t``: ``[B, H, d, S]``, ``v``: ``[B, H, S, d]``), per batch row over
    its own keys where rows start at different slots (see the module docstring)."""

    def __init__(self, region: fx.GraphModule):
        super().__init__()
        self.region = region

    def forward(self, q, k_t, v, *rest):
        if q.size(0) == 1 or q.is_cuda:  # one row (every step of one prompt) never cuts
            return self.region(q, k_t, v, *rest)
        S = k_t.size(-1)
        mask = next((t for t in rest if isinstance(t, torch.Tensor) and t.dim() == 4 and t.size(-1) == S), None)
        if mask is None or mask.size(0) == 1:
            return self.region(q, k_t, v, *rest)
        below = torch.finfo(mask.dtype).min / 2 if mask.dtype.is_floating_point else 0.0
        firsts = first_keys(mask, below)
        if max(firsts) == 0:
            return self.region(q, k_t, v, *rest)
        B = q.size(0)
        rows = []
        for b, lo in enumerate(firsts):
            cut = [q[b:b + 1], k_t[b:b + 1, ..., lo:], v[b:b + 1, :, lo:]]
            for t in rest:
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    if t.dim() == 4 and t.size(-1) == S:
                        t = t[..., lo:]
                    if t.size(0) == B:
                        t = t[b:b + 1]
                cut.append(t)
            rows.append(self.region(*cut))
        return torch.cat(rows, dim=0)


def eager_attention_rows(gm: fx.GraphModule) -> bool:
    """Rewrite every ``q @ k^T -> softmax -> P @ V`` of ``gm`` into a `PerRowAttention` call (in place;
    recompiles). Returns whether anything changed."""
    changed = False
    for softmax in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX_OPS]:
        out = _output_matmul(softmax)
        scores = _scores_matmul(softmax) if out is not None else None
        region = _region(scores, out) if scores is not None else None
        if region is None or len(scores.args) != 2 or len(out.args) != 2:
            continue
        members = set(region)
        first = [scores.args[0], scores.args[1], out.args[1]]
        if any(not isinstance(n, fx.Node) or n in members for n in first):
            continue
        inputs = list(first)
        for node in region:
            inputs.extend(a for a in node.all_input_nodes if a not in members and a not in inputs)
        name = f"eager_attention_rows_{sum(1 for n, _ in gm.named_children() if n.startswith('eager_attention'))}"
        gm.add_submodule(name, PerRowAttention(_sub_module(region, inputs, out, gm)))
        with gm.graph.inserting_before(out):
            call = gm.graph.call_module(name, tuple(inputs))
        call.meta.update(out.meta)
        out.replace_all_uses_with(call)
        for node in reversed(region):
            gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return changed
