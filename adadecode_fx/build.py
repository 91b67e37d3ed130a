"""``build_program(model, heads, config) -> DecodeProgram``: capture, passes, lowering, warm-up.

This is the one place a model becomes a decoding program:

1. `structural_graph`: `capture` + the passes that do not depend on the heads (cached per model);
2. `insert_exit_probes` with the resolved exit layers and heads;
3. a `DecodeProgram` over the result, told what it needs of the model (vocabulary, EOS, device, dtype);
4. `lower` for ``config.backend``; compiled backends then warm up every shape class.

`adadecode_fx.runtime.AdaDecoder(model, heads, config)` calls `build_program` through
`register_program_builder` (below), so the runtime never imports what sits above it.
"""
from __future__ import annotations

import weakref

import torch

from .capture import attention_windows, check_supported
from .capture_cache import cached_capture
from .config import AdaDecodeConfig
from .errors import AdaDecodeError
from .heads.format import ExitHeads
from .lower import lower
from .notices import notice, roughly
from .passes import PASSES, PassSettings, insert_exit_probes, run_passes
from .passes.split_layers import copy_graph
from .rope_lengths import full_depth_positions
from .runtime.decoder import register_program_builder
from .runtime.program import DecodeProgram

_STRUCTURAL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CAPTURE_S_PER_LAYER = 0.7  # SmolLM2-135M (30 layers) captures in about 20 s on 2 CPU cores
# what lowering + warm-up cost the first time, per backend (2 CPU cores; docs/lowering.md)
_LOWERING_NOTICES = {
    "inductor": "compiling the segments with inductor (one shared layer template, prologue, epilogue and probe, "
                "three shape classes each): 1-2 min on 2 CPU cores the first time; inductor caches the kernels "
                "on disk, so later runs compile in about 10-30 s",
    "tensorrt": "building TensorRT engines for the segments (minutes; once per decoder)",
}


def structural_graph(model) -> torch.fx.GraphModule:
    """Capture + the heads-independent passes, kept per model object (the capture itself is also cached
    on disk per model structure, `capture_cache`; capturing a real model takes ~20 s).

    Returns a fresh top-level module over shared segments, so probes can be inserted without touching
    the cached one. The cache is invalidated if the model's weights were replaced (e.g. by ``.to()``).
    """
    key = (model.get_input_embeddings().weight.data_ptr(), model.get_output_embeddings().weight.data_ptr(),
           model.get_input_embeddings().weight.dtype)
    hit = _STRUCTURAL.get(model)
    if hit is None or hit[0] != key:
        def announce(path):
            layers = model.config.num_hidden_layers
            kept = f"kept in {path.parent} for later runs" if path is not None else "not kept (cache off)"
            notice(f"capturing {type(model).__name__} with torch.export and cutting it into {layers} layer segments "
                   f"({roughly(_CAPTURE_S_PER_LAYER * layers)} on 2 CPU cores, once per model structure); {kept}")

        gm = run_passes(cached_capture(model, announce), PassSettings(attention_windows=attention_windows(model)),
                        passes=[p for p in PASSES if p is not insert_exit_probes])
        _STRUCTURAL[model] = hit = (key, gm)
    gm = hit[1]
    fresh = torch.fx.GraphModule(gm, copy_graph(gm.graph))
    fresh.meta.update(gm.meta)
    return fresh


def resolve_config(model, heads: ExitHeads | None, config: AdaDecodeConfig | None) -> AdaDecodeConfig:
    """``config`` checked against ``model`` and ``heads``, with its defaults filled (`AdaDecodeConfig.resolve`)."""
    config = (config or AdaDecodeConfig()).resolve(heads, model.config.num_hidden_layers)
    if heads is not None:
        heads.check(model)
    if config.exit_layers and heads is None:
        raise AdaDecodeError("exit layers were given but no heads: pass ExitHeads (or ExitHeads.identity)")
    last = model.config.num_hidden_layers - 1  # the last layer's head is the model's own (ExitHeads.weight)
    missing = [l for l in config.exit_layers if l not in heads.layers and l != last] if heads is not None else []
    if missing:
        raise AdaDecodeError(f"no head for exit layers {missing}; the heads cover {list(heads.layers)}")
    model_dtype = str(model.get_input_embeddings().weight.dtype).replace("torch.", "")
    if config.dtype == "auto":
        config.dtype = model_dtype
    if config.dtype != model_dtype:
        raise AdaDecodeError(
            f"the model is {model_dtype} but config.dtype is {config.dtype}: load the model in that dtype "
            f"(adadecode_fx.models.load(..., dtype={config.dtype!r})) or set config.dtype={model_dtype!r}")
    return config


def build_program(model, heads: ExitHeads | None = None, config: AdaDecodeConfig | None = None) -> DecodeProgram:
    """The lowered, warmed-up decoding program of ``model`` with exit probes for ``heads``."""
    check_supported(model)
    config = resolve_config(model, heads, config)
    gm = run_passes(structural_graph(model), PassSettings(config.exit_layers, heads), passes=(insert_exit_probes,))
    embeddings = model.get_input_embeddings().weight
    program = DecodeProgram(gm).replace(
        config=config, heads=heads, model=model, vocab_size=model.config.vocab_size,
        eos_token_id=getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        device=embeddings.device, dtype=embeddings.dtype,
        max_positions=getattr(model.config, "max_position_embeddings", None),
        full_depth_positions=full_depth_positions(model.config))
    if config.backend in _LOWERING_NOTICES:
        notice(_LOWERING_NOTICES[config.backend])
    if config.exit_layers and gm.meta.get("block_linear_rows"):
        notice(f"{gm.meta['block_linear_rows']} bf16 linears have no exact block kernel on this CPU "
               f"({gm.meta['block_linear']}), so their deferred rows run one row at a time: exact, but the "
               "exits save less or cost time here; compare with `adadecode bench` (heads_gain), or decode "
               "without heads (README, Limits)")
    program = lower(program, config)
    if program.needs_warm_up:
        program.warm_up()
    return program


register_program_builder(build_program)

__all__ = ["build_program", "resolve_config", "structural_graph"]
