"""The ``"adadecode"`` torch.compile backend.

``torch.compile(model, backend="adadecode", options={...})`` (registered through the
``torch_dynamo_backends`` entry point, so no import is needed first) receives dynamo's graph of the
model's forward, runs `split_layers` on it (the same pass the decoding program starts with) and lowers
the split graph: segment by segment in eager mode, or as a whole through inductor. The compiled
forward is therefore the model's full-depth forward, unchanged in meaning.

Decoding is a loop around many forwards with state between them (per-layer K/V fill, parked rows,
verification), which one forward graph cannot hold. So the compiled object is also the handle for
`adadecode_fx.generate(compiled, input_ids, ...)`, which builds an `AdaDecoder` from the original
model (``compiled._orig_mod``) and the same options. ``compiled.generate`` is Hugging Face's own
loop over the *uncompiled* forward; use ``model.generate(..., custom_generate=adadecode_fx.generate)``
to keep HF's interface.

Options: every `AdaDecodeConfig` field (``threshold``, ``exit_layers``, ``max_pending``, ``backend``,
``kv_bucket``...) plus ``heads`` (a directory, an `ExitHeads`, or ``"shipped"``, the default).
"""
from __future__ import annotations

import logging

import torch
from torch import fx

from .config import AdaDecodeConfig, check_names, config_fields
from .errors import AdaDecodeError, UnsupportedModelError

log = logging.getLogger(__name__)

BACKEND_NAME = "adadecode"


def parse_options(options) -> tuple[dict, object]:
    """``options`` dict -> (config fields the user set, heads spec), validated: unknown keys and bad
    values are errors, not ignored. Fields left out default to the heads' calibration."""
    options = dict(options or {})
    check_names(options, ("heads",) + config_fields(), "adadecode option(s)")
    heads = options.pop("heads", "shipped")
    AdaDecodeConfig(**options)
    return options, heads


def adadecode_backend(gm: fx.GraphModule, example_inputs, options=None, **_):
    """Dynamo backend: split the forward graph at decoder-layer boundaries and lower it."""
    from .passes import PassSettings, split_layers

    fields, _heads = parse_options(options)  # bad options fail at the first call, with a clear message
    try:
        split = split_layers(gm, PassSettings())
    except UnsupportedModelError as e:
        # Dynamo hands over one graph per stretch between graph breaks (forward hooks, which
        # transformers registers for output_hidden_states, ...): a stretch without the whole layer list
        # cannot be cut into layers and runs as traced. Decoding does not depend on this forward.
        log.info("adadecode: a graph of %d nodes runs unsplit (%s)", len(gm.graph.nodes), e)
        split = gm
    if fields.get("backend") == "inductor":
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(split, example_inputs)
    # "eager" runs the segments as they are; ONNX Runtime and TensorRT lower the *decoding program*
    # (adadecode_fx.lower), so for them the full-depth forward stays eager too.
    return split.forward


def _backend_options(callback) -> dict | None:
    """The ``options`` on torch.compile's backend wrapper (``_TorchCompileWrapper.kwargs``) when it wraps
    ``backend="adadecode"``, reached from dynamo's callback; None for another backend."""
    obj = callback
    for _ in range(8):
        if obj is None:
            break
        if getattr(obj, "compiler_name", None) == BACKEND_NAME:
            return dict((getattr(obj, "kwargs", None) or {}).get("options") or {})
        obj = getattr(obj, "_torchdynamo_orig_backend", None)
    return None


def compiled_options(compiled) -> dict:
    """The ``options`` a module was compiled with, for ``backend="adadecode"``.

    torch keeps them on the backend wrapper reachable from the ``OptimizedModule``'s dynamo context; we
    walk that chain rather than ask users to repeat them."""
    found = _backend_options(getattr(getattr(compiled, "dynamo_ctx", None), "callback", None))
    if found is None:
        raise AdaDecodeError(
            "this object was not made by torch.compile(model, backend='adadecode'); pass the model itself "
            "(adadecode_fx.generate(model, ..., exit_heads=..., adadecode=AdaDecodeConfig(...)))")
    return found


def compiled_in_place_options(model) -> dict | None:
    """The ``options`` of ``model.compile(backend="adadecode", options=...)`` (``nn.Module.compile``
    compiles the module's call in place: dynamo's callback is a free variable of that compiled call);
    None where the model was not compiled in place with this backend."""
    import inspect

    call = getattr(model, "_compiled_call_impl", None)
    if call is None:
        return None
    try:
        callback = inspect.getclosurevars(call).nonlocals.get("callback")
    except (TypeError, ValueError):  # not a plain function: a torch that compiles otherwise
        return None
    return _backend_options(callback)


def is_compiled(obj) -> bool:
    return isinstance(obj, torch._dynamo.eval_frame.OptimizedModule)
