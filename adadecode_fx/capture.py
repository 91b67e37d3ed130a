"""Capture a Hugging Face causal LM as one ATen FX graph with explicit per-layer K/V tensors.

The model is called through a thin wrapper whose inputs are plain tensors:
``input_ids [1, T]``, ``position_ids [1, T]``, ``cache_position [T]`` and one K and one V buffer
``[1, H_kv, S, D]`` per decoder layer. The wrapper hands HF a `Cache` whose layers write the new rows
into those buffers with ``index_copy_`` at ``cache_position`` and return the whole buffer, so the graph
reads and writes K/V as ordinary tensors (never HF cache objects). T and S are symbolic.

Parameters are not lifted to inputs: the returned graph reads them with ``get_attr`` nodes bound to the
model's own tensors, so capturing costs no weight memory.
"""
from __future__ import annotations

import io
import logging
import re
import sys
from contextlib import contextmanager, redirect_stderr

import torch
from torch import nn

from .errors import UnsupportedModelError
from .rope_lengths import default_frequencies_for_dynamic

KV_NAME = re.compile(r"^kv_(\d+)_([01])$")


def _cache_classes():
    from transformers.cache_utils import Cache, CacheLayerMixin

    class ExplicitKVLayer(CacheLayerMixin):
        is_compileable = True
        is_sliding = False

        def __init__(self, keys, values, cache_position):
            super().__init__()
            self.keys, self.values, self.cache_position = keys, values, cache_position
            self.is_initialized = True

        def lazy_initialization(self, *args, **kwargs):
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys.index_copy_(2, self.cache_position, key_states)
            self.values.index_copy_(2, self.cache_position, value_states)
            return self.keys, self.values

        def get_mask_sizes(self, query_length):
            return self.keys.shape[2], 0

        def get_seq_length(self):
            # Mask rows start at the first position of the block being processed.
            return self.cache_position[0]

        def get_max_length(self):
            return self.keys.shape[2]

    class ExplicitKVCache(Cache):
        def __init__(self, kv, cache_position):
            super().__init__(layers=[ExplicitKVLayer(k, v, cache_position) for k, v in kv])

    return ExplicitKVCache


class _ExplicitKVWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self._cache_cls = _cache_classes()

    def forward(self, input_ids, position_ids, cache_position, attention_mask, kv):
        cache = self._cache_cls(kv, cache_position)
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         cache=cache, use_cache=True)
        return out.logits


# layer kinds whose state is per-layer attention K/V, the only state AdaDecode defers and rolls back
_ATTENTION_KINDS = {"attention", "full_attention", "sliding_attention", "chunked_attention"}
_STATELESS_KINDS = {"mlp", "moe", "dense", "sparse"}  # feed-forward-only layers: nothing to keep
_LAYER_KIND_FIELDS = ("layer_types", "layers_block_type", "block_types")


def _other_state_error(model, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(model).__name__} {what}. AdaDecode defers and rolls back per-layer attention K/V only, so it "
        "supports decoders whose every layer is attention (Llama, Qwen2/3, Mistral, Gemma-2, Phi-3, GPT-NeoX, "
        "...); decode this model with model.generate")


def check_supported(model) -> None:
    config = getattr(model, "config", None)
    if config is None or not isinstance(model, nn.Module):
        # a bound method, or one compiled by torch.compile (which keeps it as __wrapped__)
        owner = getattr(model, "__self__", getattr(getattr(model, "__wrapped__", None), "__self__", None))
        hint = (f"; got a method of {type(owner).__name__}: pass the model itself, or "
                "torch.compile(model, backend='adadecode'), not its forward" if isinstance(owner, nn.Module) else "")
        raise UnsupportedModelError(f"expected a Hugging Face PreTrainedModel (an nn.Module with .config){hint}")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model; AdaDecode needs a decoder-only causal LM "
            "(load it with AutoModelForCausalLM)")
    can_generate = getattr(model, "can_generate", None)
    if (not getattr(config, "is_causal", True) or model.get_output_embeddings() is None
            or (callable(can_generate) and not can_generate())):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a causal language model with an LM head; "
            "load a decoder-only model with AutoModelForCausalLM")
    try:
        config.num_hidden_layers
    except AttributeError:
        raise UnsupportedModelError(
            f"{type(model).__name__}'s config ({type(config).__name__}) has no num_hidden_layers: it wraps its "
            "text decoder (a multimodal or speech model?); AdaDecode decodes a decoder-only text model, so load "
            "the text decoder alone (AutoModelForCausalLM.from_config(config.get_text_config()) and its "
            "weights)") from None
    for field in _LAYER_KIND_FIELDS:
        kinds = getattr(config, field, None)
        if isinstance(kinds, (list, tuple)) and all(isinstance(k, str) for k in kinds):
            other = sorted(set(kinds) - _ATTENTION_KINDS - _STATELESS_KINDS)
            if other:
                raise _other_state_error(model, f"has {', '.join(other)} layers (config.{field}), which keep a "
                                                "state other than attention K/V")


@torch.no_grad()
def kv_shapes(model) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per-layer K and V row shapes ([1, H, 1, D]), read off one eager step rather than from the config."""
    from transformers import DynamicCache

    cache = DynamicCache()
    dev = model.get_input_embeddings().weight.device
    ids = torch.zeros(1, 2, dtype=torch.long, device=dev)
    try:
        model(input_ids=ids, cache=cache, use_cache=True)
    except (IndexError, KeyError, AttributeError, TypeError, ValueError, NotImplementedError) as e:
        # a layer that wants a state of its own (convolution, SSM) finds none in a plain K/V cache
        raise _other_state_error(model, f"cannot run with a cache of attention K/V only "
                                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from e
    shapes = []
    for layer in cache.layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise _other_state_error(model, "keeps no per-layer attention K/V (recurrent or linear-attention "
                                            "layers?)")
        shapes.append(((1, k.shape[1], 1, k.shape[3]), (1, v.shape[1], 1, v.shape[3])))
    if not shapes:
        raise UnsupportedModelError(f"{type(model).__name__} did not use its cache: nothing to defer")
    return shapes


def attention_windows(model) -> tuple[int, ...]:
    """Per decoder layer, how many keys HF's cache hands a one-row step: the sliding window ``W`` of a
    local layer (`DynamicSlidingWindowLayer` keeps ``W - 1`` rows and adds the new one), ``-C`` for an
    attention chunk of ``C`` (the same cache; the op must tell the two apart, see
    `adadecode_fx.ops.attention`), 0 where the layer sees every key. Read from the cache HF's
    ``generate`` builds for the model."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    config = model.config.get_text_config(decoder=True)
    layers = DynamicCache(config=config).layers
    types = _layer_types(config, len(layers))
    return tuple((-1 if kind == "chunked_attention" else 1) * int(layer.sliding_window)
                 if isinstance(layer, DynamicSlidingWindowLayer) else 0 for layer, kind in zip(layers, types))


def _layer_types(config, count: int) -> list:
    """HF's name for each layer's attention (``chunked_attention``, ``sliding_attention``...)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
        types = list(get_layer_types_and_kwargs(config)[0])
    except (ImportError, AttributeError):  # older transformers: the config's own list, if it has one
        types = list(getattr(config, "layer_types", None) or [])
    return (types + [None] * count)[:count]


def example_inputs(model, shapes, block: int = 3, seq: int = 8, batch: int = 2):
    dev = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    ids = torch.zeros(batch, block, dtype=torch.long, device=dev)
    pos = torch.arange(block, device=dev)
    mask = torch.ones(batch, seq, dtype=torch.long, device=dev)
    kv = [(torch.zeros(batch, ks[1], seq, ks[3], dtype=dtype, device=dev),
           torch.zeros(batch, vs[1], seq, vs[3], dtype=dtype, device=dev)) for ks, vs in shapes]
    return ids, pos[None].expand(batch, block).contiguous(), pos, mask, kv


@torch.no_grad()
def capture(model) -> torch.fx.GraphModule:
    """torch.export the model's decode forward; return a flat ATen GraphModule (see module doc)."""
    check_supported(model)
    model.eval()
    shapes = kv_shapes(model)
    args = example_inputs(model, shapes)
    wrapper = _ExplicitKVWrapper(model)
    try:
        ep = _export(wrapper, args, _named_dims(len(shapes)))
    except Exception as first:  # noqa: BLE001
        if "Constraints violated" not in str(first):
            raise _capture_error(model, first) from first
        # torch 2.11 cannot prove its own symbolic-stride guards (Min(8*S, 16*S) == 8*S) for a ranged
        # K/V width, on CUDA and CPU alike; an unranged one accepts them. Newer torch takes the ranged form.
        try:
            ep = _export(wrapper, args, _named_dims(len(shapes), s_unranged=True))
        except Exception as e:  # noqa: BLE001
            raise _capture_error(model, e) from e
    gm = _unlift(ep, wrapper)
    gm.meta["num_layers"] = len(shapes)
    gm.meta["vocab_size"] = model.get_output_embeddings().weight.shape[0]
    gm.meta["kv_shapes"] = shapes
    gm.meta["model_class"] = type(model).__name__
    return gm


def _named_dims(n_layers: int, s_unranged: bool = False):
    """B and T are shared Dim objects, so every input that carries them gets the same symbol (the passes
    find positional inputs by that symbol). ``s_unranged``: the K/V width as ``Dim.DYNAMIC``."""
    B = torch.export.Dim("B", min=1, max=1 << 10)
    T = torch.export.Dim("T", min=1, max=1 << 16)
    S = torch.export.Dim.DYNAMIC if s_unranged else torch.export.Dim("S", min=2, max=1 << 17)
    return ({0: B, 1: T}, {0: B, 1: T}, {0: T}, {0: B, 1: S}, [({0: B, 2: S}, {0: B, 2: S}) for _ in range(n_layers)])


# When torch.export cannot trace a model it logs through these and prints the partial graph to stderr
# (a hundred lines or more per attempt); the error raised says why in one line (`_capture_error`).
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")


@contextmanager
def _quiet_export_failure():
    """Warnings below ERROR are dropped; stderr is held back and passed on only if the export succeeds."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    held = io.StringIO()
    try:
        with redirect_stderr(held):
            yield
        sys.stderr.write(held.getvalue())
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export(wrapper, args, dyn):
    with default_frequencies_for_dynamic(wrapper), _quiet_export_failure():
        return torch.export.export(wrapper, args, dynamic_shapes=dyn, strict=False)


def _capture_error(model, e: Exception) -> UnsupportedModelError:
    """export errors are long; keep the cause, say what it means."""
    return UnsupportedModelError(
        f"could not capture {type(model).__name__} with torch.export ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); this architecture is not supported yet")


def _unlift(ep, wrapper) -> torch.fx.GraphModule:
    """Turn lifted parameter/buffer/constant placeholders into get_attr nodes on the model's own tensors."""
    from torch.export.graph_signature import InputKind

    gm = ep.graph_module
    by_name = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    root = gm  # attributes go on the exported module itself, then we rebuild a GraphModule over it
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.kind == InputKind.PARAMETER:
            value = wrapper.get_parameter(spec.target)
        elif spec.kind == InputKind.BUFFER:
            value = wrapper.get_buffer(spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            value = ep.constants[spec.target]
        else:
            raise UnsupportedModelError(f"captured graph has an unsupported input kind {spec.kind}")
        attr = "w_" + re.sub(r"\W", "_", spec.arg.name)
        if isinstance(value, nn.Parameter):
            root.register_parameter(attr, value)
        else:
            root.register_buffer(attr, value, persistent=False)
        node = by_name[spec.arg.name]
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(attr)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    # get_attr nodes must follow the placeholders; move them to just before their first use.
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.users:
            first = min(node.users, key=_order(gm.graph))
            first.prepend(node)
    out = torch.fx.GraphModule(root, gm.graph)
    out.graph.lint()
    return out


def _order(graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]
