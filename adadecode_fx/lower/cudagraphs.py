"""CUDA-graph lowering: a static program whose steps replay a few graphs instead of launching every kernel.

A 0.5B model at batch 1 is launch-bound on a GPU: the eager runtime issues each layer's ~50 kernels
from Python. This lowering makes every shape in a decode step independent of the position, so that
whole stretches of a step can be captured once and replayed:

- **Static K/V.** One set of K/V buffers per decoder, of ``config.max_cache_len`` slots, reused by every
  generation (`KVState.over`). Attention reads the whole capacity under the prologue's mask (position
  causal mask x attention mask), as HF's static cache and gpt-fast do; rows past a query's position,
  including rows left by earlier generations, are masked. Rollback still only moves fill lengths.
- **Runs of layers.** Parked rows join a block only right after an exit layer, so from one exit layer
  to the next the block length T is constant (`DecodeProgram.runs`). Each run, with its own prologue
  (positions, masks, rotary tables for its T rows), is one static call per T = 1..max_pending + 1;
  the runtime calls it through `DecodeProgram.run_layers` (the hook this lowering fills).
- **Probes and epilogue** are static calls of their own (one row per probe; T rows for the epilogue),
  so the exit decision keeps its seam (the decoder's probe) and verification stays in the runtime.
- **Kernels.** By default a graph replays ATen's kernels, as eager PyTorch launches them (~50 a layer).
  ``config.compile_segments`` first compiles the static segments with inductor (`lower_with`: one
  template per kind of layer, dynamic T and capacity), so the graphs replay fused kernels.

On CUDA every static call is captured with ``torch.cuda.graph`` on first use and replayed after
(`adadecode_fx.lower.static_graphs`); warm-up makes all of them at construction. Elsewhere the same
calls run uncaptured over the same buffers, which is what CI tests. A prefill longer than
max_pending + 1 tokens runs uncaptured (one call per prompt; its length is not worth a graph).
Attention is plain SDPA over the block: one call per block, not `row_exact`'s one per row, since a
masked read of the whole capacity is not row-exact in bf16 anyway (docs/gpu.md).
"""
from __future__ import annotations

import torch
from torch import fx

from ..errors import AdaDecodeError
from ..ops.attention import plain_attention
from ..runtime.kv_state import KVState
from ..runtime.program import token_rows
from .eager import private_copy
from .inductor import compile_segment, lower_with
from .static_graphs import GraphBook

DEFAULT_CAPACITY = 256  # slots; capacity grows in steps of this many when a generation needs more
_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


def static_segment(gm):
    """A private copy of a segment with attention as one SDPA call per block and no metadata asserts
    (checks of what the capture fixed; inside a graph they only cost a launch at capture)."""
    if not isinstance(gm, fx.GraphModule):
        return gm
    gm = private_copy(gm)
    plain_attention(gm.graph)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


class _Segment:
    """A probe or the epilogue as a static call per block length (``rows`` up to ``limit``); one-row
    batches only, larger inputs run uncaptured."""

    def __init__(self, runner: "StaticRunner", name, fn):
        self.runner, self.name, self.fn = runner, name, fn

    def __call__(self, hidden: torch.Tensor):
        t = hidden.shape[1]
        if hidden.shape[0] != 1 or t > self.runner.max_rows:
            return self.fn(hidden)
        return self.runner.book.call((self.name, t), self.fn, (hidden,))


class StaticRunner:
    """Runs whole runs of layers over static buffers (`DecodeProgram.runner`).

    ``program``: the static segments, without a runner of their own. ``made`` counts the static calls
    made so far (graph captures on CUDA); it stays flat once `warm_up` has run, unless a generation needs
    more K/V slots than there are (the buffers grow and everything is captured again, before decoding).
    """

    def __init__(self, program, config):
        self.program = program
        self.max_rows = config.max_pending + 1
        self.device = torch.device(program.device)
        self.book = GraphBook(self.device)
        self.runs = program.runs
        self.bodies = {first: self._body(first, last) for first, last in self.runs}
        self.epilogue = _Segment(self, "epilogue", program.epilogue_fn)
        self.probes = {l: _Segment(self, ("probe", l), fn) for l, fn in program.probe_fns.items()}
        self.capacity = 0
        self._allocate(config.max_cache_len or DEFAULT_CAPACITY)

    @property
    def made(self) -> int:
        return self.book.made

    def _allocate(self, capacity: int) -> None:
        p = self.program
        self.book.clear()
        self.capacity = capacity
        self.buffers = [
            (torch.zeros(1, ks[1], capacity, ks[3], dtype=p.dtype, device=self.device),
             torch.zeros(1, vs[1], capacity, vs[3], dtype=p.dtype, device=self.device))
            for ks, vs in p.kv_shapes]
        self.kv_inputs = {f"kv_{i}_{j}": kv[j] for i, kv in enumerate(self.buffers) for j in (0, 1)}
        # the generation's left padding, read inside the graphs: positions are slots - pad
        self.mask = torch.ones(1, capacity, dtype=torch.long, device=self.device)
        self.pad = torch.zeros(1, 1, dtype=torch.long, device=self.device)

    # --- the runner protocol (DecodeProgram) ------------------------------------------------------
    def kv_state(self, capacity: int, pad=(0,)) -> KVState:
        if len(pad) != 1:
            raise AdaDecodeError("the cudagraphs backend decodes one sequence at a time (its graphs are "
                                 "captured for a batch of one); decode a batch with backend='eager' or 'inductor'")
        if capacity > self.capacity:
            step = DEFAULT_CAPACITY
            self._allocate(-(-capacity // step) * step)
            self.warm_up()
        self.mask.fill_(1)
        self.mask[:, :pad[0]] = 0
        self.pad.fill_(pad[0])
        return KVState.over(self.buffers, self.mask, pad)

    def step_inputs(self, ids, start: int) -> dict:
        """What the runs read of a step: token ids ``[1, T]`` and their slots ``[T]``. Positions, mask and
        K/V are computed or held inside the runs (`_body`), so a step builds nothing per layer."""
        rows = token_rows(ids)
        return {"input_ids": torch.tensor(rows, dtype=torch.long, device=self.device),
                "cache_position": torch.arange(start, start + len(rows[0]), device=self.device)}

    def run(self, first: int, last: int, hidden, n: int, top: dict, kv) -> torch.Tensor:
        if kv[0][0].data_ptr() != self.buffers[0][0].data_ptr():
            raise AdaDecodeError("a static program runs on its own K/V buffers: make the state with "
                                 "program.kv_state(...)")
        cache_position = top["cache_position"][-n:]
        x = top["input_ids"][:, -n:] if first == 0 else hidden
        body = self.bodies[first]
        # layer 0 sees a new token (T = 1) except in a prefill; deeper runs see T <= max_pending + 1
        if x.shape[0] == 1 and n <= (1 if first == 0 else self.max_rows):
            return self.book.call(("run", first, n), body, (cache_position, x))[0]
        return body(cache_position, x)[0]

    @torch.no_grad()
    def warm_up(self) -> None:
        """Make every static call a generation uses: runs for T = 1..max_pending + 1 (layer 0: T = 1),
        the epilogue for as many rows, every probe for one. The K/V rows this writes at slots
        0..max_pending are garbage that the next prefill overwrites and the mask hides until then; they
        are computed without padding, so they are finite (a masked row must be: 0 x NaN is NaN)."""
        self.mask.fill_(1)
        self.pad.zero_()
        like = None  # a run's output: the residual stream's width and dtype
        for t in range(1, self.max_rows + 1):
            top = self.step_inputs([0] * t, 0)
            for first, last in self.runs:
                if first == 0 and t > 1:
                    continue
                hidden = None if first == 0 else like.new_zeros(1, t, like.shape[-1])
                like = self.run(first, last, hidden, t, top, self.buffers)
            self.epilogue(like.new_zeros(1, t, like.shape[-1]))
        for probe in self.probes.values():
            probe(like[:, -1:])

    # --- one run's body ----------------------------------------------------------------------------
    def _body(self, first: int, last: int):
        prog = self.program

        def body(cache_position, x):
            n = cache_position.shape[0]
            # runs past layer 0 ignore the embeddings; the prologue still wants token ids
            ids = x if first == 0 else torch.zeros(1, n, dtype=torch.long, device=x.device)
            top = {"input_ids": ids, "cache_position": cache_position,
                   "position_ids": cache_position[None] - self.pad, "attention_mask": self.mask,
                   **self.kv_inputs}
            pro = prog.prologue(top)
            hidden = prog.embeddings(pro, n) if first == 0 else x
            for i in range(first, last + 1):
                hidden = prog.layer(i, hidden, pro, top, self.buffers)
            return (hidden,)

        return body


def lower_cudagraphs(program, config):
    """A static program: static segments, a `StaticRunner` for its runs, static probes and epilogue;
    warm-up (`DecodeProgram.warm_up`) makes every graph."""
    static = program.replace(
        prologue_fn=static_segment(program.prologue_fn), epilogue_fn=static_segment(program.epilogue_fn),
        layer_fns=[static_segment(f) for f in program.layer_fns])
    compiled = {}
    if config.compile_segments:
        # fused kernels inside the graphs: each (run, T) graph then replays a few kernels per layer instead
        # of ATen's ~50; dynamic shapes, so one compile per template serves every T and capacity
        static = lower_with(static, config, compile_segment, name="cudagraphs")
        compiled = {"compiled_templates": static.lowering["compiled_templates"]}
    runner = StaticRunner(static, config)
    return static.replace(
        runner=runner, epilogue_fn=runner.epilogue, probe_fns=dict(runner.probes), backend="cudagraphs",
        needs_warm_up=True,
        lowering={"runs": runner.runs, "max_rows": runner.max_rows, "captured": runner.device.type == "cuda",
                  "compile_segments": config.compile_segments, **compiled})
