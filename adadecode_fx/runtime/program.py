"""DecodeProgram: the segments produced by the passes, with a recipe for feeding each one.

This is the only place that knows how a segment's inputs map to runtime state; the decode loop
calls `step_prologue`, `run_layers`, `probe` and `epilogue` and never looks at graphs.

A *run* is the layers between two exit layers (`runs`): parked rows join a block only after an exit
layer, so a block keeps its length through a run. Programs run a run layer by layer, unless a lowering
gave them a ``runner`` that runs whole runs on static buffers (`adadecode_fx.lower.cudagraphs`).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import fx

from ..errors import AdaDecodeError
from ..ops.attention import prefill_block
from ..passes.split_layers import segment_calls
from .kv_state import KVState
from .sampling import ShortlistLogits


@dataclass
class PrologueOut:
    values: tuple  # prologue outputs
    rows: int      # number of positions it was run on


def token_rows(ids) -> list:
    """Token ids as ``[B][T]``: a batch of rows as it is, one flat row wrapped."""
    return ids if ids and isinstance(ids[0], (list, tuple)) else [ids]


def _narrow_last(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    size = x.shape[dim]
    return x if size == n else x.narrow(dim, size - n, n)


class DecodeProgram:
    """Segments + recipes, plus what a decoder needs to know about the model they came from.

    Lowerings never edit a program: they return `replace(...)` with their own segment callables.
    """

    # what a program knows of the model it was built from (set by `adadecode_fx.build.build_program`)
    MODEL_FIELDS = ("config", "heads", "model", "vocab_size", "eos_token_id", "dtype", "max_positions",
                    "full_depth_positions")

    def __init__(self, gm: fx.GraphModule):
        self._declare()
        self.gm = gm
        self.num_layers = gm.meta["num_layers"]
        self.exit_layers = tuple(gm.meta.get("exit_layers", ()))
        self.kv_shapes = gm.meta.get("kv_shapes")
        # per layer, the layer whose K/V buffers it reads (itself, unless it shares another's: `shared_kv`)
        self.kv_sources = list(gm.meta.get("kv_sources") or range(len(self.kv_shapes or ())))
        calls = segment_calls(gm)
        self.prologue_fn = gm.prologue
        self.epilogue_fn = gm.epilogue
        self.layer_fns = [getattr(gm, f"layer_{i}") for i in range(self.num_layers)]
        self.probe_fns = {l: getattr(gm, f"exit_probe_{l}") for l in self.exit_layers}
        # the eager ExitProbe modules: lowerings replace probe_fns, these stay (sampling needs logits)
        self.probe_modules = dict(self.probe_fns)
        self.prologue_args = [self._top_name(a) for a in calls["prologue"].args]
        self.layer_recipes = [self._layer_recipe(getattr(gm, f"layer_{i}"), calls[f"layer_{i}"])
                              for i in range(self.num_layers)]
        # which prologue output is the residual stream entering layer 0
        res = next(r for r in self.layer_recipes[0] if r[0] == "residual")
        self.embedding_index = res[1]
        for i, fn in enumerate(self.layer_fns):
            outs = next(n for n in fn.graph.nodes if n.op == "output").args[0]
            if len(outs) != 1:
                raise AssertionError(f"layer_{i} returns {len(outs)} values; expected the residual only")

    @classmethod
    def from_parts(cls, *, num_layers: int, exit_layers, kv_shapes, prologue_fn, prologue_args, layer_fns,
                   layer_recipes, embedding_index: int, epilogue_fn, probe_fns: dict, gm=None) -> "DecodeProgram":
        """A program whose segments and recipes come from elsewhere than a graph (e.g. an ONNX export's
        manifest, see `adadecode_fx.lower.onnxrt`). Recipes have the format `_layer_recipe` produces."""
        def tup(x):
            return tuple(tup(y) for y in x) if isinstance(x, (list, tuple)) else x

        self = cls.__new__(cls)
        self._declare()
        self.gm = gm
        self.num_layers = int(num_layers)
        self.exit_layers = tuple(int(l) for l in exit_layers)
        self.kv_shapes = [tup(s) for s in kv_shapes]
        self.kv_sources = list(range(len(self.kv_shapes)))
        self.prologue_fn, self.epilogue_fn = prologue_fn, epilogue_fn
        self.layer_fns = list(layer_fns)
        self.probe_fns = {int(l): fn for l, fn in probe_fns.items()}
        self.probe_modules = {}
        self.prologue_args = list(prologue_args)
        self.layer_recipes = [[tup(item) for item in recipe] for recipe in layer_recipes]
        self.embedding_index = int(embedding_index)
        if len(self.layer_fns) != self.num_layers or len(self.layer_recipes) != self.num_layers:
            raise AssertionError("one segment and one recipe per layer expected")
        return self

    def _declare(self) -> None:
        """Every attribute besides the segments and recipes, with its default."""
        self.backend = "fx"         # the lowering that made the segment callables
        self.lowering: dict = {}    # what that lowering reports (compiled templates, export directory...)
        self.needs_warm_up = False  # compiled segments: run every shape class once before decoding
        self.config = None          # the resolved AdaDecodeConfig it was built for
        self.heads = None           # the ExitHeads its probes apply (None: no probes, or not kept)
        self.model = None           # the torch model, when built from one
        self.vocab_size: int | None = None
        self.eos_token_id = None    # the model's default EOS id(s)
        self.max_positions: int | None = None  # the model's max_position_embeddings, where it has one
        # positions whose step never exits: the model computes a block differently on either side of the
        # next position, so no block may straddle it (`adadecode_fx.rope_lengths`)
        self.full_depth_positions: frozenset[int] = frozenset()
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        # runs whole runs of layers on its own K/V buffers, prologue included: ``kv_state(capacity, pad)``,
        # ``step_inputs(ids, start)``, ``run(first, last, hidden, n, top, kv)``, ``read_probe(layer,
        # hidden_last)``, ``read_predictions(logits)``, ``join(first, parked, hidden)``, ``warm_up()``
        # (see adadecode_fx.lower.cudagraphs)
        self.runner = None

    def replace(self, **changes) -> "DecodeProgram":
        """A copy with ``changes`` (declared attributes only); segment lists and dicts are copied, so the
        copy's segments can be swapped without touching this program's."""
        new = copy.copy(self)
        new.layer_fns, new.probe_fns = list(self.layer_fns), dict(self.probe_fns)
        new.probe_modules, new.lowering = dict(self.probe_modules), dict(self.lowering)
        for name, value in changes.items():
            if not hasattr(self, name) or name.startswith("_"):
                raise TypeError(f"DecodeProgram has no attribute {name!r}")
            setattr(new, name, value)
        return new

    @property
    def runs(self) -> list[tuple[int, int]]:
        """``(first, last)`` layer ranges, cut after each exit layer: a block changes length only where
        parked rows join it, right after an exit layer."""
        cuts = sorted(l for l in self.probe_fns if l < self.num_layers - 1)
        starts = [0] + [l + 1 for l in cuts]
        return list(zip(starts, cuts + [self.num_layers - 1]))

    def kv_state(self, capacity: int, bucket: int, pad=(0,)):
        """The K/V state of one generation: fresh buffers, or the runner's static ones."""
        if self.runner is not None:
            return self.runner.kv_state(capacity, pad)
        return KVState(self.kv_shapes, capacity, self.dtype, self.device, bucket, pad=pad, sources=self.kv_sources)

    @torch.no_grad()
    def warm_up(self, batch: int = 1) -> None:
        """Run every segment on each shape class a generation meets, so compiled backends compile here:
        (T=1, S=1) a one-token prefill, (T=1, S>1) a decode step, (T>1, S>1) a prefill or a deferred block.
        Without duck sizing, a prefill (T == S) shares the graph of a deferred block (T < S).
        ``batch > 1``: the same classes for a batch, and a prompt prefilled alone in row 1 of it (K/V views
        that start inside the buffers, see `KVState.row`)."""
        import torch.fx.experimental._config as fx_config

        if self.runner is not None:  # static programs make their graphs for every block length instead
            self.runner.warm_up()
            return
        state = KVState(self.kv_shapes, 8, self.dtype, self.device, 1, pad=[0] * batch, sources=self.kv_sources)
        with fx_config.patch(use_duck_shape=False):
            self._run_shape_classes(state)
            if batch > 1:
                self._run_shape_classes(state.row(1))

    def _run_shape_classes(self, state) -> None:
        for ids, start in (([0], 0), ([0], 1), ([0, 0], 2)):
            kv = state.views(start + len(ids))
            top = self.top_inputs([ids] * state.batch, start, kv, state.mask(start + len(ids)))
            pro = self.prologue(top)
            hidden = self.embeddings(pro, len(ids))
            for i in range(self.num_layers):
                hidden = self.layer(i, hidden, pro, top, kv)
                if i in self.probe_fns and len(ids) == 1:
                    self.probe(i, hidden[:, -1:])
            self.epilogue(hidden)

    @staticmethod
    def _top_name(arg):
        return arg.name

    def _layer_recipe(self, sub: fx.GraphModule, call: fx.Node):
        recipe = []
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for arg, ph in zip(call.args, placeholders):
            role = ph.meta["role"]
            from_prologue = (arg.op == "call_function" and arg.target is operator.getitem
                             and arg.args[0].target == "prologue")
            src = ("pro", arg.args[1]) if from_prologue else ("top", arg.name)
            if role[0] == "residual":
                recipe.append(("residual", src[1] if from_prologue else None))
            elif role[0] == "kv":
                recipe.append(("kv", role[2]))
            elif role[0] == "positional":
                recipe.append(("positional", src, role[1]))
            else:
                recipe.append(("shared", src))
        return recipe

    @staticmethod
    def top_inputs(ids, start: int, kv, attention_mask=None, pad=None) -> dict:
        """Graph inputs for token rows ``ids`` (``[B][T]``, or one flat row) at slots ``start, start+1, ...``
        over K/V views ``kv``. ``attention_mask`` ``[B, S]`` (default: all ones) hides pad slots; ``pad[b]``
        is row b's first real slot, so its positions are ``slot - pad[b]``."""
        dev = kv[0][0].device
        rows = token_rows(ids)
        top = {"input_ids": torch.tensor(rows, dtype=torch.long, device=dev),
               "cache_position": torch.arange(start, start + len(rows[0]), device=dev)}
        top["position_ids"] = top["cache_position"][None].repeat(len(rows), 1)
        if pad is not None and any(pad):
            top["position_ids"] = top["position_ids"] - torch.tensor(pad, device=dev)[:, None]
        if attention_mask is None:
            attention_mask = torch.ones(len(rows), kv[0][0].shape[2], dtype=torch.long, device=dev)
        top["attention_mask"] = attention_mask
        for i, (k, v) in enumerate(kv):
            top[f"kv_{i}_0"], top[f"kv_{i}_1"] = k, v
        return top

    def step_inputs(self, ids, start: int, kv, state: KVState) -> dict:
        """A step's graph inputs (`top_inputs` over ``state``'s mask and padding); a runner computes
        slots, positions, mask and K/V inside its runs and takes only what the step adds."""
        if self.runner is not None:
            return self.runner.step_inputs(ids, start)
        return self.top_inputs(ids, start, kv, state.mask(start + len(token_rows(ids)[0])), state.pad)

    # --- calls -----------------------------------------------------------------------------------
    def prologue(self, top: dict) -> PrologueOut:
        out = self.prologue_fn(*[top[n] for n in self.prologue_args])
        return PrologueOut(out, top["input_ids"].shape[1])

    def step_prologue(self, top: dict) -> PrologueOut | None:
        """The prologue a step's runs share; None where the runner computes it inside each run."""
        return None if self.runner is not None else self.prologue(top)

    def run_layers(self, first: int, last: int, hidden: torch.Tensor | None, n: int, pro: PrologueOut | None,
                   top: dict, kv) -> torch.Tensor:
        """Layers ``first..last`` on a block of ``n`` rows, the last ``n`` of ``top``: ``hidden [B, n, d]``
        enters layer ``first``; None at layer 0, which reads the embeddings."""
        if self.runner is not None:
            return self.runner.run(first, last, hidden, n, top, kv)
        if hidden is None:
            hidden = self.embeddings(pro, n)
        for i in range(first, last + 1):
            hidden = self.layer(i, hidden, pro, top, kv)
        return hidden

    def join(self, first: int, parked: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Parked rows ``[B, p, d]`` ahead of the block ``[B, t, d]`` entering layer ``first`` (a runner may
        place them where its call for that run reads them)."""
        if self.runner is not None:
            return self.runner.join(first, parked, hidden)
        return torch.cat([parked, hidden], dim=1)

    def embeddings(self, pro: PrologueOut, n: int) -> torch.Tensor:
        return _narrow_last(pro.values[self.embedding_index], 1, n)

    def layer(self, i: int, hidden: torch.Tensor, pro: PrologueOut, top: dict, kv) -> torch.Tensor:
        t = hidden.shape[1]
        args = []
        for item in self.layer_recipes[i]:
            kind = item[0]
            if kind == "residual":
                args.append(hidden)
            elif kind == "kv":
                args.append(kv[i][item[1]])
            else:
                src = item[1]
                value = pro.values[src[1]] if src[0] == "pro" else top[src[1]]
                args.append(_narrow_last(value, item[2], t) if kind == "positional" else value)
        return self.layer_fns[i](*args)[0]

    def epilogue(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.epilogue_fn(hidden)[0]

    def probe(self, layer: int, hidden_last: torch.Tensor):
        return self.probe_fns[layer](hidden_last)

    def read_probe(self, layer: int, hidden_last: torch.Tensor) -> tuple[list, list]:
        """`probe` read back to the host: per row, the token and its confidence."""
        if self.runner is not None:  # its probes bring both back in one read-back
            return self.runner.read_probe(layer, hidden_last)
        token, conf = self.probe(layer, hidden_last)
        return token.reshape(-1).tolist(), conf.reshape(-1).tolist()

    def read_predictions(self, logits: torch.Tensor) -> list[list[int]]:
        """Greedy verification's input: the argmax of ``logits [B, T, V]`` per row, read back in one call
        (a runner answers from the argmax its last graph took of them)."""
        if self.runner is not None:
            return self.runner.read_predictions(logits)
        return logits.argmax(dim=-1).tolist()

    def probe_logits(self, layer: int, hidden_last: torch.Tensor, vocab_size: int):
        """The exit head's logits for sampling: ``[B, vocab_size]``, or for a head with a shortlist
        `ShortlistLogits` (the shortlist's logits; every other token is ``-inf``)."""
        module = self.probe_modules.get(layer)
        if module is None:
            raise AdaDecodeError("sampling needs the exit heads' logits, which this program does not keep (an "
                                 "ONNX export's probes return only token and confidence); decode greedily, "
                                 "or build the decoder from the model")
        if module.vocab is None:
            return module.logits(hidden_last, vocab_size).reshape(hidden_last.shape[0], -1)
        values = module.head_logits(hidden_last).reshape(hidden_last.shape[0], -1)
        return ShortlistLogits(values, module.vocab.to(values.device), vocab_size)

    def hidden_states(self, ids: list[int], layers, state) -> tuple[dict, torch.Tensor]:
        """One full-depth pass over ``ids`` (fresh ``state``): outputs of ``layers`` and of the last layer,
        each ``[1, len(ids), d]``. What the exit probes see at decode time, for training and evaluation."""
        n = len(ids)
        kv = state.views(n)
        top = self.top_inputs(ids, 0, kv)
        keep = {}
        # a teacher-forced pass is a prefill: one attention call per layer, not one per row
        with prefill_block():
            pro = self.prologue(top)
            hidden = self.embeddings(pro, n)
            for i in range(self.num_layers):
                hidden = self.layer(i, hidden, pro, top, kv)
                if i in layers:
                    keep[i] = hidden
        return keep, hidden
