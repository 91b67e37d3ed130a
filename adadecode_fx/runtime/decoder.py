"""AdaDecoder: early exits, deferred layers and verification over a DecodeProgram.

One generation keeps: ``tokens`` (prompt + output), ``n_verified`` (the prefix that is final) and a
`KVState`. A *step* walks the layer stack once for the current token, carrying along the parked rows
of earlier early tokens at each layer (deferred work). It ends either at an exit probe that is
confident enough (the token is emitted early, its remaining layers parked) or at the last layer,
where `verify_greedy` checks every pending early token and rolls back on the first mismatch.

Sampling (``do_sample=True`` / a `SamplingConfig`): an exit probe's logits go through the same logits
processors as the final layer's; if the resulting distribution ``q`` is confident enough (max >= threshold)
an early token is drawn from it and ``q`` is kept; `verify_sampling` then accepts or resamples by the
speculative-sampling rule, so the output is distributed as plain sampling.
"""
from __future__ import annotations

import copy
import time
import weakref
from dataclasses import dataclass, field

import torch

from ..capture import capture, check_supported
from ..config import AdaDecodeConfig
from ..errors import AdaDecodeError
from ..heads import ExitHeads
from ..lower import lower, warm_up
from ..passes import PASSES, PassSettings, insert_exit_probes, run_passes
from .kv_state import KVState
from .program import DecodeProgram
from .sampling import Sampler, SamplingConfig
from .stats import DecodeStats
from .verify import verify_greedy, verify_sampling


_STRUCTURAL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def structural_graph(model) -> torch.fx.GraphModule:
    """Capture + the heads-independent passes, cached per model (capturing a real model takes ~20 s).

    Returns a fresh top-level module over shared segments, so probes can be inserted without touching
    the cached one. The cache is invalidated if the model's weights were replaced (e.g. by ``.to()``).
    """
    key = (model.get_input_embeddings().weight.data_ptr(), model.get_output_embeddings().weight.data_ptr(),
           model.get_input_embeddings().weight.dtype)
    hit = _STRUCTURAL.get(model)
    if hit is None or hit[0] != key:
        gm = run_passes(capture(model), PassSettings(), passes=[p for p in PASSES if p is not insert_exit_probes])
        _STRUCTURAL[model] = hit = (key, gm)
    gm = hit[1]
    fresh = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    fresh.meta.update(gm.meta)
    return fresh


@dataclass
class _Run:
    """One generation's mutable state."""
    tokens: list[int]      # prompt + output so far (early tokens included)
    n_verified: int        # tokens[:n_verified] are final
    prompt_len: int
    kv: KVState
    stats: DecodeStats
    origin: list[int] = field(default_factory=list)  # per output token: the layer that predicted it
    sampler: Sampler | None = None                     # None: greedy
    drafts: list = field(default_factory=list)         # sampling: q of each pending early token, in order


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [1, prompt + new] like HF generate
    new_tokens: list[int]
    stats: DecodeStats


def _eos_set(eos) -> frozenset:
    if eos is None:
        return frozenset()
    if isinstance(eos, torch.Tensor):
        eos = eos.flatten().tolist()
    return frozenset([int(eos)] if isinstance(eos, int) else (int(e) for e in eos))


class AdaDecoder:
    def __init__(self, model, heads: ExitHeads | None = None, config: AdaDecodeConfig | None = None):
        check_supported(model)
        config = config or AdaDecodeConfig()
        n = model.config.num_hidden_layers
        if heads is not None:
            heads.check(model)
        layers = config.exit_layers or (heads.layers if heads is not None else ())
        config = AdaDecodeConfig(**{**config.__dict__, "exit_layers": tuple(layers)}).validate(n)
        if layers and heads is None:
            raise AdaDecodeError("exit layers were given but no heads: pass ExitHeads (or ExitHeads.identity)")
        missing = [l for l in layers if heads is not None and l not in heads.layers]
        if missing:
            raise AdaDecodeError(f"no head for exit layers {missing}; the heads cover {list(heads.layers)}")
        model_dtype = str(model.get_input_embeddings().weight.dtype).replace("torch.", "")
        if config.dtype == "auto":
            config.dtype = model_dtype
        if config.dtype != model_dtype:
            raise AdaDecodeError(
                f"the model is {model_dtype} but config.dtype is {config.dtype}: load the model in that dtype "
                f"(adadecode_fx.models.load(..., dtype={config.dtype!r})) or set config.dtype={model_dtype!r}")
        self.model, self.heads, self.config = model, heads, config
        settings = PassSettings(config.exit_layers, heads)
        self.gm = run_passes(structural_graph(model), settings, passes=(insert_exit_probes,))
        self.program = lower(DecodeProgram(self.gm), config)
        self.kv_shapes = self.gm.meta["kv_shapes"]
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.default_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.vocab_size = model.config.vocab_size
        if config.backend != "eager":
            self.warm_up()

    def warm_up(self) -> None:
        """Run every segment once per shape class, so compiled backends compile now, not mid-generation."""
        warm_up(self.program, self.kv_shapes, self.dtype, self.device)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 64, eos_token_id="default", stop=None,
                 streamer=None, *, do_sample: bool = False, sampling: SamplingConfig | None = None,
                 **sampling_options) -> GenerationResult:
        """Greedy AdaDecode: the same tokens as plain greedy decoding of the model.

        Sampling: ``do_sample=True`` with `SamplingConfig` fields as keywords (``temperature``, ``top_k``,
        ``top_p``, ``min_p``, ``seed``, ``logits_processor``), or ``sampling=SamplingConfig(...)``. The
        output is distributed as plain sampling from the model with those settings; the same ``seed``
        gives the same tokens (``seed=None``: torch's global RNG, see `SamplingConfig`).

        ``stop(tokens) -> bool`` (optional) is asked after every *verified* token with the sequence so
        far (prompt included); generation ends at the first token it accepts, as HF stopping criteria
        do. ``streamer`` (an HF ``BaseStreamer``) receives tokens once they are verified, never an early
        token that a rollback could still take back; ``end()`` is called at the end.
        """
        prompt = self._check_prompt(input_ids)
        if sampling_options and sampling is None and not do_sample:
            raise AdaDecodeError(f"{sorted(sampling_options)} only apply when sampling: pass do_sample=True")
        if sampling is not None and sampling_options:
            raise AdaDecodeError("pass sampling settings either as sampling=SamplingConfig(...) or as keywords, "
                                 "not both")
        if sampling is None and do_sample:
            try:
                sampling = SamplingConfig(**sampling_options)
            except TypeError as e:
                raise AdaDecodeError(f"unknown sampling option: {e}") from None
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise AdaDecodeError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        eos = _eos_set(self.default_eos if eos_token_id == "default" else eos_token_id)
        start = time.perf_counter()
        P = len(prompt)
        run = _Run(tokens=list(prompt), n_verified=P, prompt_len=P,
                   kv=KVState(self.kv_shapes, P + max_new_tokens + 1, self.dtype, self.device, self.config.kv_bucket),
                   stats=DecodeStats(num_layers=self.program.num_layers, prompt_tokens=P),
                   sampler=None if sampling is None else Sampler(sampling, self.device))
        self._step(run, P - 1, allow_exit=False, count=False)  # prefill
        published = P
        while True:
            published, finished = self._publish(run, published, max_new_tokens, eos, stop, streamer)
            pending = len(run.tokens) - run.n_verified
            done = finished or len(run.tokens) - P >= max_new_tokens or run.tokens[-1] in eos
            if done and pending == 0:
                break
            if done:  # flush: run the deferred layers of the pending tokens, no new token
                self._step(run, len(run.tokens) - 2, allow_exit=False)
            else:
                self._step(run, len(run.tokens) - 1, allow_exit=pending < self.config.max_pending)
        if streamer is not None:
            streamer.end()
        stats = run.stats
        stats.seconds = time.perf_counter() - start
        stats.new_tokens = len(run.tokens) - P
        stats.token_exit_layers = run.origin
        seq = torch.tensor([run.tokens], dtype=torch.long, device=self.device)
        return GenerationResult(seq, run.tokens[P:], stats)

    def _publish(self, run: "_Run", published: int, max_new_tokens: int, eos, stop, streamer) -> tuple[int, bool]:
        """Hand newly verified tokens to ``stop``/``streamer``; cut the sequence after the first token
        that ends the generation (EOS, length, or ``stop``). Returns (tokens published, finished)."""
        tokens, P = run.tokens, run.prompt_len
        for j in range(published, run.n_verified):
            if tokens[j] in eos or j + 1 - P >= max_new_tokens or (stop is not None and stop(tokens[:j + 1])):
                # Anything after j is speculative (early tokens): drop it with its deferred rows.
                del tokens[j + 1:]
                del run.origin[j + 1 - P:]
                run.kv.parked.clear()
                run.drafts.clear()
                run.n_verified = j + 1
                if streamer is not None:
                    streamer.put(torch.tensor(tokens[published:j + 1]))
                return j + 1, True
        if streamer is not None and run.n_verified > published:
            streamer.put(torch.tensor(tokens[published:run.n_verified]))
        return run.n_verified, False

    def _step(self, run: "_Run", p_end: int, allow_exit: bool, count: bool = True) -> None:
        """Walk the layers for positions up to ``p_end``: ends at a confident exit probe (early token)
        or at the last layer (verification, maybe a rollback, and a final token)."""
        prog, L, state, stats, tokens = self.program, self.program.num_layers, run.kv, run.stats, run.tokens
        a = state.fill[-1]
        kv = state.views(p_end + 1)
        top = prog.top_inputs(tokens[a:p_end + 1], a, kv)
        pro = prog.prologue(top)
        hidden = prog.embeddings(pro, p_end + 1 - state.fill[0])
        stats.steps += count
        for layer in range(L):
            parked = state.take_parked(layer - 1) if layer else None
            if parked is not None:
                hidden = torch.cat([parked, hidden], dim=1)
            if hidden.shape[1] == 0:
                continue
            hidden = prog.layer(layer, hidden, pro, top, kv)
            state.fill[layer] = p_end + 1
            stats.critical_path_layers += count
            stats.layer_rows += hidden.shape[1] if count else 0
            if allow_exit and layer in prog.probe_fns:
                if run.sampler is None:
                    token, conf = self.exit_probe(layer, hidden[:, -1:], tokens)
                else:
                    token, conf = self._sample_exit(run, layer, hidden[:, -1:])
                if conf >= self.config.threshold:
                    state.park(layer, hidden)
                    tokens.append(token)
                    run.origin.append(layer)
                    stats.early_emitted += 1
                    return
        first = max(a, run.n_verified - 1)  # rows before this predict tokens that are already final
        logits = prog.epilogue(hidden[:, first - a:])
        if run.sampler is None:
            verdict = verify_greedy(tokens, first, logits[0].argmax(dim=-1).tolist())
        else:
            probs = run.sampler.distributions(logits[0], tokens, first)
            verdict = verify_sampling(tokens, first, probs, run.drafts, run.sampler.generator)
            run.drafts.clear()  # every pending token is now accepted or rolled back
        stats.accepted += verdict.accepted
        if verdict.rejected_at is not None:
            stats.rejected += 1
            del tokens[verdict.rejected_at:]
            del run.origin[verdict.rejected_at - run.prompt_len:]
            state.rollback(verdict.rejected_at)
        if verdict.next_token >= 0:
            tokens.append(verdict.next_token)
            run.origin.append(L - 1)
        run.n_verified = len(tokens)

    def exit_probe(self, layer: int, hidden_last: torch.Tensor, tokens: list[int]) -> tuple[int, float]:
        """The exit decision's input: the head's (token, confidence) for the newest position.

        ``tokens`` is the sequence so far (the prediction is for ``len(tokens)``); the heads ignore it,
        but tests override this method with oracle or adversarial probes that use it.
        """
        token, conf = self.program.probe(layer, hidden_last)
        return int(token), float(conf)

    def exit_logits(self, layer: int, hidden_last: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """Sampling's exit input: the head's logits ``[V]`` for the newest position (``-inf`` outside a
        shortlist). The logits processors are applied to them as to the final layer's. Tests override
        this (like `exit_probe`) to force particular early-token distributions."""
        return self.program.probe_logits(layer, hidden_last, self.vocab_size).reshape(-1)

    def _sample_exit(self, run: "_Run", layer: int, hidden_last: torch.Tensor) -> tuple[int, float]:
        """(token drawn from q, max q) and, when it will exit, q recorded for verification."""
        q = run.sampler.distribution(self.exit_logits(layer, hidden_last, run.tokens), run.tokens)
        if q is None:
            return -1, 0.0
        conf = float(q.max())
        if conf < self.config.threshold:
            return -1, conf
        run.drafts.append(q)
        return int(torch.multinomial(q, 1, generator=run.sampler.generator)), conf

    @classmethod
    def from_program(cls, program, heads, config: AdaDecodeConfig, *, vocab_size: int, eos_token_id=None,
                     device="cpu", dtype=torch.float32) -> "AdaDecoder":
        """A decoder over a ready program (e.g. `adadecode_fx.lower.onnxrt.load_exported`): no torch model."""
        self = cls.__new__(cls)
        self.model, self.heads, self.config, self.program, self.gm = None, heads, config, program, program.gm
        self.kv_shapes, self.vocab_size, self.default_eos = program.kv_shapes, vocab_size, eos_token_id
        self.device, self.dtype = torch.device(device), dtype
        return self

    # ------------------------------------------------------------------------------------------------
    def _check_prompt(self, input_ids) -> list[int]:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() == 2:
                if input_ids.shape[0] != 1:
                    raise AdaDecodeError(
                        f"batch size {input_ids.shape[0]} is not supported yet (batching is planned with "
                        "sampling support); call generate once per prompt")
                input_ids = input_ids[0]
            if input_ids.dim() != 1:
                raise AdaDecodeError(f"input_ids must be [1, length] or [length], got shape {tuple(input_ids.shape)}")
            ids = input_ids.tolist()
        else:
            ids = list(input_ids)
            if ids and isinstance(ids[0], (list, tuple)):
                if len(ids) != 1:
                    raise AdaDecodeError(f"batch size {len(ids)} is not supported yet; call generate per prompt")
                ids = list(ids[0])
        if not ids:
            raise AdaDecodeError("the prompt is empty: give at least one token (e.g. the BOS token)")
        vocab = self.vocab_size
        if any(isinstance(t, bool) or not float(t).is_integer() for t in ids):
            raise AdaDecodeError("token ids must be integers")
        bad = [t for t in ids if not 0 <= int(t) < vocab]
        if bad:
            raise AdaDecodeError(f"token ids {bad[:5]} are outside the vocabulary (size {vocab})")
        return [int(t) for t in ids]
