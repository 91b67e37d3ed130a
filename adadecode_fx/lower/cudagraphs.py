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
- **Probes inside the runs.** A run that ends at an exit layer also computes that layer's probe on its
  last row, in the same graph; the decoder's probe call then reads what the run computed
  (`_FoldedProbe`), so the exit decision keeps its seam and costs no replay of its own. The last run
  computes the LM head over its block too, unless a probe follows the last layer (`_Epilogue`);
  verification and rollback stay in the runtime.
- **One step input.** A step writes ``[end, newest token]`` into one static tensor; the graphs derive
  slots, positions and masks from it. Outputs are the graphs' own buffers, not copies: only a parked
  block outlives the next replay of its graph, and `KVState.park` copies it.
- **Kernels.** By default a graph replays ATen's kernels, as eager PyTorch launches them (~40 a layer;
  a run makes its boolean attention mask additive once rather than SDPA in every layer).
  ``config.compile_segments`` (by default on a GPU: `compiles_segments`) first compiles the static
  segments with inductor (`lower_with`: one template per kind of layer, dynamic T and capacity), so the
  graphs replay fused kernels.

On CUDA every static call is captured with ``torch.cuda.graph`` on first use and replayed after
(`adadecode_fx.lower.static_graphs`); warm-up makes all of them at construction. Elsewhere the same
calls run uncaptured over the same buffers, which is what CI tests. A prefill longer than
max_pending + 1 tokens runs uncaptured (one call per prompt; its length is not worth a graph).
Attention is plain SDPA over the block: one call per block, not `row_exact`'s one per row, since a
masked read of the whole capacity is not row-exact in bf16 anyway (docs/gpu.md).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import AdaDecodeError
from ..runtime.kv_state import KVState, kv_buffers
from ..runtime.program import PrologueOut, token_rows
from .inductor import compile_segment, lower_with
from .static_graphs import GraphBook
from .static_segments import host_reading_layers, layers_read_token_ids, sdpa_mask_outputs, static_segment

DEFAULT_CAPACITY = 256  # slots; capacity grows in steps of this many when a generation needs more


class _Epilogue:
    """The final norm and LM head. Folded into the last run's graph where no probe follows the last layer
    (`StaticRunner.epilogue_folded`): asked about a tail of that run's block, it answers with the rows of
    what the graph computed; anything else (a prefill's uncaptured last run) runs uncaptured. Otherwise it
    is a static call per block length of its own (one-row batches; larger inputs run uncaptured)."""

    def __init__(self, runner: "StaticRunner", fn):
        self.runner, self.fn = runner, fn

    def __call__(self, hidden: torch.Tensor):
        runner, t = self.runner, hidden.shape[1]
        if runner.epilogue_folded:
            if runner.logits is not None and runner.is_tail_of_block(hidden):
                return (runner.logits[:, runner.logits.shape[1] - t:],)
            return self.fn(hidden)
        if hidden.shape[0] != 1 or t > runner.max_rows:
            return self.fn(hidden)
        return runner.book.call(("epilogue", t), self.fn, (hidden,))


class _FoldedProbe:
    """An exit probe computed inside the run that ends at its layer (`StaticRunner._body`): asked about
    the last row of that run's output, it answers with what the run's graph computed, so a probe costs
    no replay, copy or launch of its own. Anything else (never asked in decoding) runs uncaptured and is
    counted in ``runner.unfolded_probes``."""

    def __init__(self, runner: "StaticRunner", layer: int, fn):
        self.runner, self.layer, self.fn = runner, layer, fn

    def __call__(self, hidden_last: torch.Tensor):
        folded = self.runner.fold_of(self.layer, hidden_last)
        if folded is not None:
            return folded.token, folded.confidence
        self.runner.unfolded_probes += 1
        return self.fn(hidden_last)

    def read(self, hidden_last: torch.Tensor) -> tuple[list, list]:
        """Tokens and confidences as lists, from one read-back of the run's packed pair (a GPU waits for
        each read-back, so the pair travels together)."""
        folded = self.runner.fold_of(self.layer, hidden_last)
        if folded is None:
            token, conf = self(hidden_last)
            return token.reshape(-1).tolist(), conf.reshape(-1).tolist()
        tokens, confs = folded.packed.tolist()
        return [int(t) for t in tokens], confs


def _is_tail(x: torch.Tensor, of: torch.Tensor | None) -> bool:
    """``x`` is the last rows (dim 1) of ``of`` itself (the same memory), not merely equal."""
    if of is None or x.shape[0] != 1 or x.shape[1] > of.shape[1] or x.dtype != of.dtype:
        return False
    return x.data_ptr() == of.data_ptr() + (of.shape[1] - x.shape[1]) * of.stride(1) * of.element_size()


class _Fold(NamedTuple):
    """What a run that ends at an exit layer computed for that layer's probe."""
    layer: int
    token: torch.Tensor       # [1, 1]
    confidence: torch.Tensor  # [1, 1]
    packed: torch.Tensor      # [2, 1] float64: token and confidence, read back together


class StaticRunner:
    """Runs whole runs of layers over static buffers (`DecodeProgram.runner`).

    ``program``: the static segments, without a runner of their own. ``made`` counts the static calls
    made so far (graph captures on CUDA); it stays flat once `warm_up` has run, unless a generation needs
    more K/V slots than there are (the buffers grow and everything is captured again, before decoding).

    What a step hands the graphs is one static tensor, ``step = [end, token]``: the slot after the
    step's last row and the newest token, written once per step (`step_inputs`). A run of ``T`` rows
    covers slots ``end - T .. end - 1``; layer 0's graph reads the token. The only other input is the
    block entering a deeper run.
    """

    def __init__(self, program, config, mask_outputs=None):
        self.program = program
        self.max_rows = config.max_pending + 1
        self.device = torch.device(program.device)
        # boolean attention masks become additive once per run (`sdpa_mask_outputs`), as SDPA makes them
        self.mask_outputs = {i: (torch.zeros((), dtype=d, device=self.device),
                                 torch.full((), float("-inf"), dtype=d, device=self.device))
                             for i, d in (mask_outputs or {}).items()}
        self.book = GraphBook(self.device)
        # a probe after the last layer may draft from the last run's block: then the LM head must not run
        # with every last run (that probe decides whether it runs at all)
        self.epilogue_folded = program.num_layers - 1 not in program.probe_fns
        self.runs = program.runs
        self.bodies = {first: self._body(first, last) for first, last in self.runs}
        self.previous = {first: prev for (prev, _), (first, _) in zip(self.runs, self.runs[1:])}
        self.epilogue = _Epilogue(self, program.epilogue_fn)
        self.probes = {l: _FoldedProbe(self, l, fn) for l, fn in program.probe_fns.items()}
        # of the last run: its output block [1, T, d], what it computed for the probe at its last layer,
        # and the logits [1, T, V] of its rows and their argmax [1, T] if it was the last layer's (captured)
        self.block: torch.Tensor | None = None
        self.folded: _Fold | None = None
        self.logits: torch.Tensor | None = None
        self.predictions: torch.Tensor | None = None
        self.unfolded_probes = 0
        self.step = torch.zeros(2, dtype=torch.long, device=self.device)
        self.end, self.token = self.step[:1], self.step[1:].view(1, 1)
        # the step's values on the host, written through numpy; on CUDA pinned, so that the copy does not
        # wait for the stream, and guarded by an event, so that it is not rewritten before the copy has run
        self.staging = torch.zeros(2, dtype=torch.long)
        self.copied = None
        if self.device.type == "cuda":
            self.staging, self.copied = self.staging.pin_memory(), torch.cuda.Event()
        self.staging_np = self.staging.numpy()
        self.reads_ids = layers_read_token_ids(program)
        self.capacity = 0
        self._allocate(config.max_cache_len or DEFAULT_CAPACITY)

    @property
    def made(self) -> int:
        return self.book.made

    def _allocate(self, capacity: int) -> None:
        p = self.program
        self.book.clear()
        self.capacity = capacity
        self.buffers = kv_buffers(p.kv_shapes, 1, capacity, p.dtype, self.device, p.kv_sources)
        self.kv_inputs = {f"kv_{i}_{j}": kv[j] for i, kv in enumerate(self.buffers) for j in (0, 1)}
        # the generation's left padding, read inside the graphs: positions are slots - pad
        self.mask = torch.ones(1, capacity, dtype=torch.long, device=self.device)
        self.pad = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        # each slot's token id, written by layer 0's run, where runs past it need them (`layers_read_token_ids`)
        self.tokens = torch.zeros(1, capacity, dtype=torch.long, device=self.device) if self.reads_ids else None

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
        """Writes ``step = [end, newest token]`` (one host-to-device copy); the runs compute slots,
        positions and mask from it inside their graphs. A prefill of several tokens, whose layer 0 runs
        uncaptured, also reads the token rows (``rows``)."""
        rows = token_rows(ids)
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy (long done: every step reads something back)
        self.staging_np[0], self.staging_np[1] = start + len(rows[0]), rows[0][-1]
        self.step.copy_(self.staging, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        return {"rows": rows}

    def run(self, first: int, last: int, hidden, n: int, top: dict, kv) -> torch.Tensor:
        if kv[0][0].data_ptr() != self.buffers[0][0].data_ptr():
            raise AdaDecodeError("a static program runs on its own K/V buffers: make the state with "
                                 "program.kv_state(...)")
        body = self.bodies[first]
        self.block = self.folded = self.logits = self.predictions = None
        # layer 0 sees the new token (T = 1) except in a prefill; deeper runs see T <= max_pending + 1
        static = n == 1 if first == 0 else hidden.shape[0] == 1 and n <= self.max_rows
        if static:
            out = (self.book.call(("run", 0, 1), self._layer0) if first == 0
                   else self.book.call(("run", first, n), body, (hidden,), self._entering(first, n)))
        else:  # a prefill's: uncaptured, and without the LM head over every prompt row
            x = hidden if first else torch.tensor([r[-n:] for r in top["rows"]], dtype=torch.long, device=self.device)
            out = body(x, with_logits=False)
        self.block = out[0]
        if last in self.probes:
            self.folded = _Fold(last, *out[1:4])
        elif static and self.epilogue_folded and last == self.program.num_layers - 1:
            self.logits, self.predictions = out[1:3]
        return self.block

    def _entering(self, first: int, n: int):
        """The input buffer for a new call of the run at ``first`` on ``n`` rows: the output buffer of the
        previous run's call on ``n`` rows, where there is one. A block that goes on without parked rows
        joining is then read where the previous graph wrote it: no copy, no launch."""
        before = self.book.calls.get(("run", self.previous[first], n))
        return None if before is None or before.outputs is None else (before.outputs[0],)

    def join(self, first: int, parked: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``parked`` rows ahead of ``hidden`` entering the run at ``first``, concatenated straight into the
        input buffer of that run's call (one launch, where a new tensor would need a second to copy it in)."""
        call = self.book.calls.get(("run", first, parked.shape[1] + hidden.shape[1]))
        if call is None or hidden.shape[0] != 1:
            return torch.cat([parked, hidden], dim=1)
        return torch.cat([parked, hidden], dim=1, out=call.inputs[0])

    def read_probe(self, layer: int, hidden_last: torch.Tensor) -> tuple[list, list]:
        return self.probes[layer].read(hidden_last)

    def is_tail_of_block(self, x: torch.Tensor) -> bool:
        """``x`` is the last rows of the last run's output itself (the same memory), not merely equal."""
        return _is_tail(x, self.block)

    def read_predictions(self, logits: torch.Tensor) -> list[list[int]]:
        """Greedy verification's argmax of ``logits [1, t, V]``, read back: where they are the last rows of
        what the last run's graph computed, the argmax that graph took of them (no launch of its own)."""
        if self.predictions is not None and _is_tail(logits, self.logits):
            return self.predictions[:, self.predictions.shape[1] - logits.shape[1]:].tolist()
        return logits.argmax(dim=-1).tolist()

    def fold_of(self, layer: int, hidden_last: torch.Tensor):
        """What the last run computed for the probe at ``layer``, if ``hidden_last`` is its block's last row."""
        f = self.folded
        if f is None or f.layer != layer or hidden_last.shape[1] != 1 or not self.is_tail_of_block(hidden_last):
            return None
        return f

    def _layer0(self):
        return self.bodies[0](self.token)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Make every static call a generation uses: runs for T = 1..max_pending + 1 (layer 0: T = 1,
        probes and the epilogue inside), or the epilogue for as many rows where it is not. The K/V rows
        this writes at slots
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
            if not self.epilogue_folded:
                self.epilogue(like.new_zeros(1, t, like.shape[-1]))
        self.block = self.folded = self.logits = self.predictions = None

    # --- one run's body ----------------------------------------------------------------------------
    def _body(self, first: int, last: int):
        prog = self.program
        probe = prog.probe_fns.get(last)
        logits_here = last == prog.num_layers - 1 and self.epilogue_folded

        def body(x, with_logits=logits_here):
            # x: token ids [1, T] at layer 0, else the block entering layer `first` [1, T, d]
            n = x.shape[1]
            cache_position = self.end - n + torch.arange(n, device=x.device)  # [T]: slots end-T .. end-1
            # runs past layer 0 ignore the embeddings; the prologue still wants token ids, and where the
            # layers read more than the embeddings of them, the rows' own (layer 0 keeps them per slot)
            if first == 0:
                ids = x
                if self.tokens is not None:
                    self.tokens.index_copy_(1, cache_position, x)
            elif self.tokens is not None:
                ids = self.tokens.index_select(1, cache_position)
            else:
                ids = torch.zeros(1, n, dtype=torch.long, device=x.device)
            top = {"input_ids": ids, "cache_position": cache_position,
                   "position_ids": cache_position[None] - self.pad, "attention_mask": self.mask,
                   **self.kv_inputs}
            pro = prog.prologue(top)
            if self.mask_outputs:
                pro = PrologueOut(tuple(torch.where(v, *self.mask_outputs[i])
                                        if i in self.mask_outputs and v.dtype == torch.bool else v
                                        for i, v in enumerate(pro.values)), pro.rows)
            hidden = prog.embeddings(pro, n) if first == 0 else x
            for i in range(first, last + 1):
                hidden = prog.layer(i, hidden, pro, top, self.buffers)
            out = (hidden,)
            if probe is not None:
                token, confidence = probe(hidden[:, -1:])  # the exit decision's input, read back by the runtime
                # float64 holds every token id and confidence exactly: one tensor, one read-back
                packed = torch.stack([token.reshape(-1).to(torch.float64),
                                      confidence.reshape(-1).to(torch.float64)])
                out += (token, confidence, packed)
            if with_logits:
                logits = prog.epilogue_fn(hidden)[0]  # [1, T, V]: verification reads the rows it needs
                out += (logits, logits.argmax(dim=-1))  # and greedy verification their argmax [1, T]
            return out

        return body


def compiles_segments(config, device) -> bool:
    """``config.compile_segments``, where None means: on a GPU. There inductor's fused kernels made the graphs
    1.8x faster than ATen's (Qwen2.5-Coder-0.5B bf16, H200); elsewhere nothing is captured, so the compile
    would only cost time."""
    if config.compile_segments is None:
        return torch.device(device).type == "cuda"
    return config.compile_segments


def lower_cudagraphs(program, config):
    """A static program: static segments, a `StaticRunner` for its runs (probes and epilogue inside);
    warm-up (`DecodeProgram.warm_up`) makes every graph."""
    static = program.replace(
        prologue_fn=static_segment(program.prologue_fn), epilogue_fn=static_segment(program.epilogue_fn),
        layer_fns=[static_segment(f) for f in program.layer_fns])
    reading = host_reading_layers(static) if torch.device(program.device).type == "cuda" else []
    if reading:
        raise AdaDecodeError(
            f"the cudagraphs backend cannot capture {reading[0]} ({len(reading)} such layers): its experts run "
            f"transformers' grouped-matmul fallback, which reads the group sizes back to the host ({program.dtype} "
            "weights). Load the model in bfloat16 (ATen's grouped matmul), or decode with backend='eager'")
    masks = sdpa_mask_outputs(static)
    compiled = {}
    compile_segments = compiles_segments(config, program.device)
    if compile_segments:
        # fused kernels inside the graphs: each (run, T) graph then replays a few kernels per layer instead
        # of ATen's ~50; dynamic shapes, so one compile per template serves every T and capacity
        static = lower_with(static, config, compile_segment, name="cudagraphs")
        compiled = {"compiled_templates": static.lowering["compiled_templates"]}
    runner = StaticRunner(static, config, masks)
    return static.replace(
        runner=runner, epilogue_fn=runner.epilogue, probe_fns=dict(runner.probes), backend="cudagraphs",
        needs_warm_up=True,
        lowering={"runs": runner.runs, "max_rows": runner.max_rows, "captured": runner.device.type == "cuda",
                  "compile_segments": compile_segments, **compiled})
