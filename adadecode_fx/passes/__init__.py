"""Graph passes that turn a captured decoder into an AdaDecode program.

Each pass has the signature ``(gm: GraphModule, settings: PassSettings) -> GraphModule``; `PASSES` is the order they run in. They are
importable on their own for use in another FX pipeline::

    from adadecode_fx.capture import capture
    from adadecode_fx.passes import PassSettings, run_passes
    gm = run_passes(capture(model), PassSettings(exit_layers=(8, 16), heads=heads))
"""
from __future__ import annotations

from torch import fx

from .block_linear import block_linear
from .deferred_batching import deferred_batching
from .explicit_kv import explicit_kv
from .insert_exit_probes import ExitProbe, insert_exit_probes
from .row_exact_attention import row_exact_attention
from .row_exact_experts import row_exact_experts
from .settings import PassSettings
from .shared_kv import shared_kv
from .split_layers import split_layers

PASSES = (shared_kv, split_layers, explicit_kv, deferred_batching, row_exact_attention, row_exact_experts, block_linear,
          insert_exit_probes)


def run_passes(gm: fx.GraphModule, settings: PassSettings, passes=PASSES) -> fx.GraphModule:
    """``passes`` in order. A pass returns a module whose code is current: it recompiles what it edits
    (fx's ``recompile`` regenerates every child segment's code too, ~0.1 s for a 30-layer model, so it is
    not repeated here)."""
    for p in passes:
        gm = p(gm, settings)
        gm.graph.lint()
    return gm


__all__ = ["PASSES", "PassSettings", "run_passes", "shared_kv", "split_layers", "explicit_kv", "deferred_batching",
           "row_exact_attention", "row_exact_experts", "block_linear", "insert_exit_probes", "ExitProbe"]
