"""AdaDecoder: early exits, deferred layers and verification over a DecodeProgram.

One generation keeps: ``tokens`` (prompt + output), ``n_verified`` (the prefix that is final) and a
`KVState`. A *step* walks the layer stack once for the current token, carrying along the parked rows
of earlier early tokens at each layer (deferred work). It ends either at an exit probe that is
confident enough (the token is emitted early, its remaining layers parked) or at the last layer,
where `verify_greedy` checks every pending early token and rolls back on the first mismatch.

Sampling (``do_sample=True`` / a `SamplingConfig`): an exit probe's logits go through the same warpers
as the final layer's, giving ``q``; if the head is confident enough (its own softmax's max and max ``q``
both >= threshold) an early token is drawn from ``q`` and ``q`` is kept; `verify_sampling` then accepts
or resamples by the speculative-sampling rule, so the output is distributed as plain sampling.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import torch

from ..config import check_names
from ..errors import AdaDecodeError
from ..notices import notice
from ..ops.attention import prefill_block
from .kv_state import KVState
from .policy import GreedyDecisions, ProcessedGreedyDecisions, Probe, SamplingDecisions
from .program import DecodeProgram
from .prompts import check_positions, check_switches, prompt_batch
from .sampling import Sampler, SamplingConfig, check_processors, row_processors
from .stats import DecodeStats

_BUILDER: list = []
# AdaDecoder.generate's named parameters, for the suggestion when a keyword is misspelt
_GENERATE_ARGUMENTS = ("input_ids", "max_new_tokens", "eos_token_id", "stop", "streamer", "attention_mask",
                       "pad_token_id", "do_sample", "sampling", "output_logits")


def register_program_builder(build) -> None:
    """``build(model, heads, config) -> DecodeProgram``, used when an `AdaDecoder` is given a model.
    `adadecode_fx.build` registers `build_program` when the package is imported; the runtime sits below
    capture, passes and lowering and never imports them."""
    _BUILDER[:] = [build]


@dataclass
class _Run:
    """One generation's mutable state. Rows advance in lockstep: every row has the same length."""
    rows: list[list[int]]  # per batch row: pad slots + prompt + output so far (early tokens included)
    n_verified: int        # rows[b][:n_verified] are final
    prompt_len: int        # slots taken by the left-padded prompts
    kv: KVState
    stats: DecodeStats
    origin: list[int] = field(default_factory=list)  # per output slot: the layer that predicted it
    decisions: object = None                           # `Decisions`: greedy or sampling (runtime/policy.py)
    sampler: Sampler | None = None                     # None: greedy
    drafts: list = field(default_factory=list)         # sampling, per row: q of each pending early token
    ends: list = field(default_factory=list)           # per row: its length once finished (EOS/stop), else None
    final_logits: list | None = None                   # one row, if asked: per verified slot, its logits [V]
    batch_rows: list[int] | None = None                # per row: its row of the batch (a prefill runs one alone)

    def active(self) -> list[int]:
        return [b for b, e in enumerate(self.ends) if e is None]

    def batch_row(self, b: int) -> int:
        return b if self.batch_rows is None else self.batch_rows[b]


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [B, prompt + new] like HF generate (finished rows padded on the right)
    new_tokens: list         # list[int] for one prompt, else one list per row
    stats: DecodeStats
    logits: list | None = None  # ``output_logits=True``: per new token, the final layer's logits [V] (float32)


def _eos_set(eos) -> frozenset:
    if eos is None:
        return frozenset()
    if isinstance(eos, torch.Tensor):
        eos = eos.flatten().tolist()
    return frozenset([int(eos)] if isinstance(eos, int) else (int(e) for e in eos))


class AdaDecoder:
    """Early exits, deferred layers and verification over a `DecodeProgram`.

    ``AdaDecoder(model, heads, config)`` builds the program (`adadecode_fx.build.build_program`: capture,
    passes, lowering, warm-up); ``AdaDecoder(program)`` decodes a ready one (e.g. an ONNX export's).
    ``probe``: a `Probe` callable ``(layer, hidden_last, rows) -> (tokens, confidences)`` that replaces the
    heads' greedy exit decision (tests plug oracle and adversarial probes in here).
    """

    def __init__(self, model_or_program, heads=None, config=None, *, probe: Probe | None = None):
        if isinstance(model_or_program, DecodeProgram):
            if heads is not None or config is not None:
                raise AdaDecodeError("a ready DecodeProgram carries its heads and config; pass the program alone")
            program = model_or_program
        else:
            if not _BUILDER:
                raise AdaDecodeError("no program builder is registered: import adadecode_fx first")
            program = _BUILDER[0](model_or_program, heads, config)
        self.program = program
        self.model, self.heads, self.config, self.gm = program.model, program.heads, program.config, program.gm
        self.kv_shapes, self.vocab_size, self.default_eos = program.kv_shapes, program.vocab_size, program.eos_token_id
        self.device, self.dtype = program.device, program.dtype
        self.probe = probe or self.exit_probe
        self._warmed = {1} if program.needs_warm_up else set()

    def warm_up(self, batch: int = 1) -> None:
        """Run every segment once per shape class, so compiled backends compile now, not mid-generation.
        Batches (``batch > 1``) have their own classes, warmed on the first batched generation."""
        key = min(batch, 2)  # dynamo specialises a batch of 1; every larger batch shares one graph
        if key not in self._warmed:
            if key > 1:
                notice(f"compiling the {self.program.backend} segments for batches (about as long as the first "
                       "warm-up; once per decoder, every later batch size reuses it)")
            self.program.warm_up(batch=key)
            self._warmed.add(key)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 64, eos_token_id="default", stop=None,
                 streamer=None, *, attention_mask=None, pad_token_id=None, do_sample: bool = False,
                 sampling: SamplingConfig | None = None, output_logits: bool = False,
                 **sampling_options) -> GenerationResult:
        """Greedy AdaDecode: the same tokens as plain greedy decoding of the model.

        ``input_ids``: one prompt (``[T]``, ``[1, T]`` or a list of ints) or a batch: ``[B, T]`` with a
        left-padding ``attention_mask``, or a list of token lists (padded here). Every row's output equals
        that row's plain greedy output. Rows move in lockstep: a step exits early only if every unfinished
        row's probe is confident, and a wrong early token in one row rolls back all rows to that slot
        (the others recompute the same tokens). A row that ends (EOS, ``stop``) is padded with
        ``pad_token_id`` (default: the model's, else its EOS) while the others go on.

        ``logits_processor`` (an HF ``LogitsProcessorList``, e.g. a repetition penalty) without sampling: the
        same tokens as HF greedy search with those processors (`ProcessedGreedyDecisions`).

        Sampling: ``do_sample=True`` with `SamplingConfig` fields as keywords (``temperature``, ``top_k``,
        ``top_p``, ``min_p``, ``seed``, ``logits_processor``), or ``sampling=SamplingConfig(...)``. The
        output is distributed as plain sampling from the model with those settings; the same ``seed``
        gives the same tokens (``seed=None``: torch's global RNG, see `SamplingConfig`).

        ``output_logits=True`` (one prompt): ``result.logits`` holds, per new token, the final layer's logits
        that chose it (as float32, what HF's ``output_logits`` returns), never a head's.

        ``stop(tokens) -> bool`` (optional) is asked after every *verified* token with the row so far
        (prompt included, padding not); a row ends at the first token it accepts, as HF stopping criteria
        do. ``streamer`` (an HF ``BaseStreamer``, one prompt only) receives tokens once they are verified,
        never an early token that a rollback could still take back; ``end()`` is called at the end.
        """
        batch = prompt_batch(input_ids, attention_mask, vocab=self.vocab_size)
        processors = None
        if not do_sample and sampling is None and "logits_processor" in sampling_options:
            processors = sampling_options.pop("logits_processor")
            check_processors(processors, "greedy decoding")
        sampling = self._sampling(do_sample, sampling, sampling_options)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise AdaDecodeError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        check_positions(batch.length - min(batch.pad), max_new_tokens, self.program.max_positions)
        check_switches(batch.pad, batch.length, max_new_tokens, self.program.full_depth_positions)
        if output_logits and batch.size > 1:
            raise AdaDecodeError("output_logits (HF: output_scores, output_logits) takes one sequence (a finished row "
                                 "of a batch has no logits to give); ask for them one prompt at a time")
        if streamer is not None and batch.size > 1:
            raise AdaDecodeError("a streamer takes one sequence (as in HF); stream one prompt at a time or "
                                 "drop the streamer for a batch")
        eos = _eos_set(self.default_eos if eos_token_id == "default" else eos_token_id)
        if batch.size > 1 and self.config.backend in ("onnxruntime", "tensorrt", "cudagraphs"):
            raise AdaDecodeError(f"the {self.config.backend} engines are built for one sequence; decode a batch with "
                                 "backend='eager' or 'inductor', or one prompt at a time")
        if batch.size > 1 and self.program.needs_warm_up:
            self.warm_up(batch=batch.size)
        start = time.perf_counter()
        P, B = batch.length, batch.size
        sampler = None if sampling is None else Sampler(sampling, self.device, B)
        if sampler is not None:
            decisions = SamplingDecisions(self.exit_logits, sampler, self.config.gamma)
        elif processors:
            decisions = ProcessedGreedyDecisions(self.exit_logits, row_processors(processors, B), self.config.gamma)
        else:
            decisions = GreedyDecisions(self.probe, self.config.gamma, self.program.read_predictions)
        run = _Run(rows=batch.rows, n_verified=P, prompt_len=P, decisions=decisions, sampler=sampler,
                   kv=self._kv_state(batch, max_new_tokens),
                   stats=DecodeStats(num_layers=self.program.num_layers, prompt_tokens=P - min(batch.pad), batch_size=B),
                   drafts=[[] for _ in range(B)], ends=[None] * B, final_logits=[] if output_logits else None)
        self._prefill(run)
        published = P
        while True:
            published, finished = self._publish(run, published, max_new_tokens, eos, stop, streamer)
            length = len(run.rows[0])
            pending = length - run.n_verified
            done = (finished or length - P >= max_new_tokens
                    or all(run.rows[b][-1] in eos for b in run.active()))
            if done and pending == 0:
                break
            if done:  # flush: run the deferred layers of the pending tokens, no new token
                self._step(run, length - 2, allow_exit=False)
            else:
                self._step(run, length - 1, allow_exit=pending < self.config.max_pending
                           and length - 1 - min(run.kv.pad) not in self.program.full_depth_positions)
        if streamer is not None:
            streamer.end()
        return self._result(run, batch, start, pad_token_id, eos)

    def _kv_state(self, batch, max_new_tokens: int) -> KVState:
        capacity = batch.length + max_new_tokens + 1
        try:
            return self.program.kv_state(capacity, self.config.kv_bucket, pad=batch.pad)
        except RuntimeError as e:  # out of memory: models without a position limit accept any length
            per_slot = sum(k[1] * k[3] + v[1] * v[3] for l, (k, v) in enumerate(self.kv_shapes)
                           if self.program.kv_sources[l] == l) * batch.size
            gb = per_slot * capacity * torch.empty((), dtype=self.dtype).element_size() / 2 ** 30
            raise AdaDecodeError(f"cannot allocate the K/V cache for {capacity:,} positions ({gb:,.1f} GiB on "
                                 f"{self.device}): lower max_new_tokens ({str(e).splitlines()[0][:120]})") from None

    @staticmethod
    def _sampling(do_sample, sampling, options) -> SamplingConfig | None:
        check_names(options, _GENERATE_ARGUMENTS + tuple(f.name for f in fields(SamplingConfig)),
                    "AdaDecoder.generate argument(s)")
        if options and sampling is None and not do_sample:
            raise AdaDecodeError(f"{sorted(options)} only apply when sampling: pass do_sample=True")
        if sampling is not None and options:
            raise AdaDecodeError("pass sampling settings either as sampling=SamplingConfig(...) or as keywords, "
                                 "not both")
        if sampling is None and do_sample:
            sampling = SamplingConfig(**options)
        return sampling

    def _result(self, run: "_Run", batch, start: float, pad_token_id, eos) -> GenerationResult:
        P, length = run.prompt_len, len(run.rows[0])
        ends = [length if e is None else e for e in run.ends]
        if pad_token_id is None:
            pad_token_id = getattr(getattr(self.model, "generation_config", None), "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = min(eos) if eos else 0
        new = [row[P:end] for row, end in zip(run.rows, ends)]
        seq = [[pad_token_id] * p + row[p:P] + out + [pad_token_id] * (length - P - len(out))
               for row, p, out in zip(run.rows, batch.pad, new)]
        stats = run.stats
        stats.seconds = time.perf_counter() - start
        stats.new_tokens = sum(len(out) for out in new)
        stats.token_exit_layers = run.origin
        logits = None if run.final_logits is None else run.final_logits[:len(new[0])]
        return GenerationResult(torch.tensor(seq, dtype=torch.long, device=self.device),
                                new[0] if batch.single else new, stats, logits)

    def _publish(self, run: "_Run", published: int, max_new_tokens: int, eos, stop, streamer) -> tuple[int, bool]:
        """Hand newly verified slots to ``stop``/``streamer``; a row ends after its first token that ends
        the generation (EOS, length, or ``stop``). Once every row has ended, the speculative tail (early
        tokens and their deferred rows) is dropped. Returns (slots published, all rows finished)."""
        P = run.prompt_len
        for j in range(published, run.n_verified):
            for b in run.active():
                row = run.rows[b]
                if row[j] in eos or j + 1 - P >= max_new_tokens or (
                        stop is not None and stop(row[run.kv.pad[b]:j + 1])):
                    run.ends[b] = j + 1
            if not run.active():
                for row in run.rows:
                    del row[j + 1:]
                del run.origin[j + 1 - P:]
                run.kv.parked.clear()
                for d in run.drafts:
                    d.clear()
                run.n_verified = j + 1
                if streamer is not None:
                    streamer.put(torch.tensor(run.rows[0][published:j + 1]))
                return j + 1, True
        if streamer is not None and run.n_verified > published:
            streamer.put(torch.tensor(run.rows[0][published:run.n_verified]))
        return run.n_verified, False

    def _prefill(self, run: "_Run") -> None:
        """Each prompt alone over its real slots (see `KVState.row`), each ending with its first token."""
        P = run.prompt_len
        for b, row in enumerate(run.rows):
            alone = _Run(rows=[row], n_verified=P, prompt_len=P, kv=run.kv.row(b), stats=run.stats,
                         decisions=run.decisions, sampler=run.sampler, drafts=[[]], ends=[None],
                         final_logits=run.final_logits, batch_rows=[b])
            with prefill_block():  # one attention call over the prompt, as plain decoding prefills
                self._step(alone, P - 1, allow_exit=False, count=False)
        run.kv.fill = [P] * len(run.kv.fill)
        run.origin.append(self.program.num_layers - 1)
        run.stats.critical_path_layers += self.program.num_layers  # the first token ran the whole stack
        run.n_verified = P + 1

    def _step(self, run: "_Run", p_end: int, allow_exit: bool, count: bool = True) -> None:
        """Walk the layers for slots up to ``p_end``, one run (the layers up to the next exit layer) at a
        time: ends at a confident exit probe (an early token; after the last layer, a drafted one whose
        row waits only for the LM head) or at the LM head over every waiting row (verification, maybe a
        rollback, and a final token per row)."""
        prog, state, stats = self.program, run.kv, run.stats
        a = state.fill[-1]
        hidden = None  # the block leaving the previous run; None before layer 0
        stats.steps += count
        if a <= p_end:  # rows to walk (a flush of rows drafted after the last layer has none)
            kv = state.views(p_end + 1)
            top = prog.step_inputs([row[a:p_end + 1] for row in run.rows], a, kv, state)
            pro = prog.step_prologue(top)
            for first, last in prog.runs:
                parked = state.take_parked(first - 1) if first else None
                if parked is not None:
                    hidden = parked if hidden is None else prog.join(first, parked, hidden)
                n = p_end + 1 - state.fill[first]  # every layer of a run holds the same fill
                if n == 0:
                    continue
                hidden = prog.run_layers(first, last, hidden, n, pro, top, kv)
                depth = last + 1 - first
                state.fill[first:last + 1] = [p_end + 1] * depth
                stats.critical_path_layers += depth if count else 0
                stats.layer_rows += n * depth if count else 0
                if allow_exit and last in prog.probe_fns and self._may_draft(run, last) and \
                        self._exit(run, last, hidden[:, -1:]):
                    state.park(last, hidden)
                    return
        drafted = state.take_parked(prog.num_layers - 1)  # rows a probe after the last layer let through
        if drafted is not None:
            hidden = drafted if hidden is None else torch.cat([drafted, hidden], dim=1)
            a -= drafted.shape[1]
        first = max(a, run.n_verified - 1)  # rows before this predict tokens that are already final
        self._verify(run, first, prog.epilogue(hidden[:, first - a:]))

    def _may_draft(self, run: "_Run", layer: int) -> bool:
        """A probe after the last layer saves only a share of an LM-head call, and drafting there puts off
        the verification of every pending token: after an early token that skipped layers (the riskier
        kind) a rejection would also discard the next token's whole pass. So it drafts only behind drafts
        of its own kind; exits before the last layer are always asked."""
        last = self.program.num_layers - 1
        return layer < last or all(o == last for o in run.origin[run.n_verified - run.prompt_len:])

    def _exit(self, run: "_Run", layer: int, hidden_last: torch.Tensor) -> bool:
        """The exit decision (batch-wide, `Decisions.draft`): one early token per row, or go on."""
        tokens = run.decisions.draft(run, layer, hidden_last)
        if tokens is None:
            return False
        for b, row in enumerate(run.rows):
            row.append(tokens[b] if tokens[b] >= 0 else row[-1])  # finished rows: any valid id
        run.origin.append(layer)
        run.stats.early_emitted += len(run.active())
        return True

    def _verify(self, run: "_Run", first: int, logits: torch.Tensor) -> None:
        """Check every pending early token of every unfinished row against the final layer's
        ``logits [B, T, V]`` (row ``k`` predicts slot ``first + k + 1``); roll all rows back to the
        earliest wrong slot and give each row its final token there."""
        L, P, verified = self.program.num_layers, run.prompt_len, run.n_verified
        verdicts = run.decisions.judge(run, first, logits)
        run.stats.accepted += sum(v.accepted for v in verdicts.values())
        cut = min((v.rejected_at for v in verdicts.values() if v.rejected_at is not None), default=None)
        if cut is not None:
            run.stats.rejected += sum(v.rejected_at is not None for v in verdicts.values())
            for b, row in enumerate(run.rows):
                v = verdicts.get(b)
                keep = v.next_token if v is not None and v.rejected_at == cut else row[cut]
                del row[cut:]
                row.append(keep)
            del run.origin[cut - P:]
            run.origin.append(L - 1)
            run.kv.rollback(cut)
        elif any(v.next_token >= 0 for v in verdicts.values()):
            for b, row in enumerate(run.rows):
                v = verdicts.get(b)
                row.append(v.next_token if v is not None else row[-1])
            run.origin.append(L - 1)
        run.n_verified = len(run.rows[0])
        if run.final_logits is not None:  # row k predicted slot first + k + 1; copies: a graph's buffer is reused
            run.final_logits += [logits[0, s - first - 1].to(torch.float32, copy=True)
                                 for s in range(verified, run.n_verified)]

    def exit_probe(self, layer: int, hidden_last: torch.Tensor, rows: list[list[int]]) -> tuple[list, list]:
        """The exit decision's input: per row, the head's (token, confidence) for the newest slot.

        ``rows`` are the sequences so far (the prediction is for slot ``len(rows[b])``); the heads ignore
        them, but tests override this method with oracle or adversarial probes that use them.
        """
        return self.program.read_probe(layer, hidden_last)

    def exit_logits(self, layer: int, hidden_last: torch.Tensor, rows: list[list[int]]):
        """Sampling's exit input: the head's logits ``[B, V]`` for the newest slot, or `ShortlistLogits`
        for a head with a shortlist (``-inf`` outside it). The logits processors are applied to them as to
        the final layer's. Tests override this (like `exit_probe`) to force particular early-token
        distributions."""
        return self.program.probe_logits(layer, hidden_last, self.vocab_size)

    @classmethod
    def from_program(cls, program: DecodeProgram) -> "AdaDecoder":
        """A decoder over a ready program (the same as ``AdaDecoder(program)``)."""
        return cls(program)
