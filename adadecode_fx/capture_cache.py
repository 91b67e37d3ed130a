"""An on-disk cache of `capture`'s graph, so a later process skips torch.export (10-30 s).

What is stored, per model structure: the flat ATen graph that `capture` returns, node by node (op,
target, arguments), each node's fake value as sizes and strides over the capture's shape symbols, its
module stack (`split_layers` cuts by it), the graph's meta, and the few small constant tensors that
export lifts (rotary frequencies). Weights are not stored: a ``get_attr`` node names a parameter or
buffer of the model and is bound to the model's own tensor on load, exactly as a fresh capture binds it.
The passes are not cached: they run on the loaded graph as on a fresh one (well under a second).

The key hashes everything the graph depends on: the model's class and config (attention
implementation included), the name, shape, dtype and device of each of its tensors and which are
tied, the torch and transformers versions, and the source of `capture` and of this file. A file is
written whole (temporary name, then rename). An entry that cannot be read, holds anything but the
records below, or does not fit the model is captured again and overwritten, never used.
``ADADECODE_CAPTURE_CACHE=off`` turns the cache off; any other value is the directory to use
(default: ``captures/`` under `cache_paths.cache_dir`).
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from .cache_paths import cache_dir
from .notices import notice
from .rope_lengths import default_frequencies_for_dynamic

FORMAT = 1
_KEPT_META = ("nn_module_stack",)
_PY_TARGET_MODULES = ("_operator", "operator", "builtins", "math", "torch")


class CaptureCacheError(Exception):
    """A graph that this cache cannot store, or an entry that cannot be used."""


@dataclass(frozen=True)
class _Ref:  # an argument that is the value of node ``index``
    index: int


@dataclass(frozen=True)
class _TorchConst:  # a dtype, layout, memory format or device, by name
    kind: str
    name: str


@dataclass(frozen=True)
class _TensorVal:  # a node's fake tensor: sizes and strides as ints or sympy expressions
    size: tuple
    stride: tuple
    storage_offset: object
    dtype: _TorchConst
    device: _TorchConst


@dataclass(frozen=True)
class _SymVal:  # a node's SymInt / SymFloat / SymBool
    kind: str
    expr: object


@dataclass(frozen=True)
class _Constant:  # a lifted constant tensor, by value
    dtype: _TorchConst
    shape: tuple
    data: bytes


# ---------------------------------------------------------------- where and under which key


def cache_location() -> Path | None:
    """The directory of cached captures, or None when ``ADADECODE_CAPTURE_CACHE=off``."""
    value = os.environ.get("ADADECODE_CAPTURE_CACHE", "")
    if value.lower() in ("off", "0", "none", "false"):
        return None
    return Path(value).expanduser() if value else cache_dir() / "captures"


def _source_digest() -> str:
    from . import capture, rope_lengths
    h = hashlib.sha256()
    for path in (Path(capture.__file__), Path(rope_lengths.__file__), Path(__file__)):
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_key(model: nn.Module) -> str:
    """A digest of everything `capture(model)`'s graph depends on (not the weights' values)."""
    import transformers

    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
    first_name: dict[int, str] = {}
    tensors = []
    for kind, named in (("p", model.named_parameters(remove_duplicate=False)),
                        ("b", model.named_buffers(remove_duplicate=False))):
        for name, t in named:
            alias = first_name.setdefault(id(t), name)
            tensors.append((kind, name, tuple(t.shape), str(t.dtype), str(t.device), alias))
    fields = {
        "format": FORMAT, "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": config, "attn": getattr(model.config, "_attn_implementation", None), "tensors": tensors,
        "torch": torch.__version__, "transformers": transformers.__version__, "source": _source_digest(),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---------------------------------------------------------------- encoding


def _torch_const(value) -> _TorchConst:
    if isinstance(value, torch.dtype):
        return _TorchConst("dtype", str(value).removeprefix("torch."))
    if isinstance(value, torch.device):
        return _TorchConst("device", str(value))
    if isinstance(value, torch.layout):
        return _TorchConst("layout", str(value).removeprefix("torch."))
    if isinstance(value, torch.memory_format):
        return _TorchConst("memory_format", str(value).removeprefix("torch."))
    raise CaptureCacheError(f"cannot store {type(value).__name__}")


def _encode_target(target):
    if isinstance(target, torch._ops.OpOverload):
        return ("op", str(target))  # "aten.mm.default"
    module = getattr(target, "__module__", None) or ""
    if callable(target) and module.split(".")[0] in _PY_TARGET_MODULES and not isinstance(target, torch._ops.OperatorBase):
        return ("py", module, target.__qualname__)
    raise CaptureCacheError(f"cannot store call target {target!r}")


def _encode_arg(value, index: dict):
    if isinstance(value, fx.Node):
        return _Ref(index[value])
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):  # includes fx's immutable_list
        items = [_encode_arg(v, index) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {k: _encode_arg(v, index) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(*(_encode_arg(v, index) for v in (value.start, value.stop, value.step)))
    return _torch_const(value)


def _encode_size(value):
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return int(value)


def _encode_val(value):
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, torch.Tensor):
        return _TensorVal(tuple(_encode_size(s) for s in value.shape), tuple(_encode_size(s) for s in value.stride()),
                          _encode_size(value.storage_offset()), _torch_const(value.dtype), _torch_const(value.device))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _SymVal(type(value).__name__, value.node.expr)
    if isinstance(value, (list, tuple)):
        items = [_encode_val(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    raise CaptureCacheError(f"cannot store a node value of type {type(value).__name__}")


def _shape_env(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and getattr(val, "fake_mode", None) is not None:
            return val.fake_mode.shape_env
    return None


def encode(gm: fx.GraphModule, model: nn.Module) -> dict:
    """``gm`` (from `capture(model)`) as plain records; raises `CaptureCacheError` if it holds anything else."""
    names = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
    names.update({id(t): n for n, t in model.named_buffers(remove_duplicate=False)})
    index: dict[fx.Node, int] = {}
    nodes, attrs = [], {}
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        target = node.target
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            if id(value) in names:
                attrs[node.target] = ("model", names[id(value)], isinstance(value, nn.Parameter))
            elif isinstance(value, torch.Tensor) and value.numel() <= 1 << 16:
                flat = value.detach().cpu().contiguous()
                attrs[node.target] = ("constant", _Constant(_torch_const(flat.dtype), tuple(flat.shape),
                                                            flat.view(torch.uint8).numpy().tobytes()))
            else:
                raise CaptureCacheError(f"get_attr {node.target} is neither a model tensor nor a small constant")
        elif node.op == "call_function":
            target = _encode_target(node.target)
        elif node.op not in ("placeholder", "output"):
            raise CaptureCacheError(f"cannot store a {node.op} node")
        meta = {k: node.meta[k] for k in _KEPT_META if k in node.meta}
        if "val" in node.meta:
            meta["val"] = _encode_val(node.meta["val"])
        nodes.append((node.op, node.name, target, _encode_arg(node.args, index), _encode_arg(node.kwargs, index), meta))
    env = _shape_env(gm)
    symbols = {}
    if env is not None:
        hints = getattr(env, "backed_var_to_val", None) or env.var_to_val
        for sym, hint in hints.items():
            rng = env.var_to_range.get(sym)
            symbols[sym] = (int(hint), _bound(rng.lower, 0) if rng is not None else 0,
                            _bound(rng.upper, None) if rng is not None else None)
    return {"format": FORMAT, "nodes": nodes, "attrs": attrs, "symbols": symbols, "meta": dict(gm.meta)}


def _bound(value, unbounded):
    """A range bound as an int, or ``unbounded`` for an infinite one. torch's ``int_oo`` (the upper bound of
    an unranged export dim) answers ``is_finite`` with True and fails ``int()``."""
    try:
        return int(value) if value.is_finite else unbounded
    except (TypeError, ValueError, AttributeError, OverflowError):
        return unbounded


# ---------------------------------------------------------------- decoding


class _RecordUnpickler(pickle.Unpickler):
    """Reads only this module's records, sympy expressions and a few builtins: a cache file is data."""

    _BUILTINS = {"slice", "set", "frozenset", "complex"}

    def find_class(self, module, name):
        if module == __name__ and name in ("_Ref", "_TorchConst", "_TensorVal", "_SymVal", "_Constant"):
            return super().find_class(module, name)
        if module == "builtins" and name in self._BUILTINS:
            return super().find_class(module, name)
        if module.split(".")[0] == "sympy" or module.startswith("torch.utils._sympy"):
            import sympy
            obj = super().find_class(module, name)
            if isinstance(obj, type) and issubclass(obj, sympy.Basic):
                return obj
        raise CaptureCacheError(f"unexpected object {module}.{name} in a capture cache file")


def _resolve_const(c: _TorchConst):
    if c.kind == "device":
        return torch.device(c.name)
    value = getattr(torch, c.name)
    expected = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}[c.kind]
    if not isinstance(value, expected):
        raise CaptureCacheError(f"torch.{c.name} is not a {c.kind}")
    return value


def _resolve_target(t):
    if t[0] == "op":
        ns, op, overload = t[1].split(".")
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    _, module, qualname = t
    if module.split(".")[0] not in _PY_TARGET_MODULES:
        raise CaptureCacheError(f"call target from module {module}")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _decode_arg(value, nodes: list):
    if isinstance(value, _Ref):
        return nodes[value.index]
    if isinstance(value, _TorchConst):
        return _resolve_const(value)
    if isinstance(value, tuple):
        return tuple(_decode_arg(v, nodes) for v in value)
    if isinstance(value, list):
        return [_decode_arg(v, nodes) for v in value]
    if isinstance(value, dict):
        return {k: _decode_arg(v, nodes) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(*(_decode_arg(v, nodes) for v in (value.start, value.stop, value.step)))
    return value


class _Values:
    """Rebuilds fake values over a fresh ShapeEnv holding the stored symbols, hints and ranges. A value
    is a meta tensor of the stored sizes and strides wrapped as a FakeTensor, as `FakeTensorMode.from_tensor`
    wraps one; that is half the cost of creating it through the mode (2,000+ nodes per model)."""

    def __init__(self, symbols: dict):
        from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        from torch.utils._sympy.value_ranges import ValueRanges
        import sympy

        self.env = ShapeEnv()
        hints = self.env.backed_var_to_val if hasattr(self.env, "backed_var_to_val") else self.env.var_to_val
        for sym, (hint, lo, hi) in symbols.items():
            hints[sym] = sympy.Integer(hint)
            self.env.var_to_range[sym] = ValueRanges(lo, sympy.oo if hi is None else hi)
        self.hints = {sym: h for sym, (h, _, _) in symbols.items()}
        self.mode = FakeTensorMode(shape_env=self.env, allow_non_fake_inputs=True)
        self.fake = FakeTensor
        self.sizes: dict = {}

    def size(self, value):
        if isinstance(value, int):
            return value
        if value not in self.sizes:
            self.sizes[value] = self.env.create_symintnode(value, hint=int(value.xreplace(self.hints)))
        return self.sizes[value]

    def __call__(self, value):
        if isinstance(value, _TensorVal):
            meta = torch.empty_strided([self.size(s) for s in value.size], [self.size(s) for s in value.stride],
                                       dtype=_resolve_const(value.dtype), device="meta")
            if value.storage_offset:
                meta = meta.as_strided(meta.shape, meta.stride(), self.size(value.storage_offset))
            return self.fake(self.mode, meta, _resolve_const(value.device))
        if isinstance(value, _SymVal):
            if value.kind == "SymInt":
                return self.size(value.expr)
            if value.kind == "SymBool":
                return self.env.create_symboolnode(value.expr)
            return self.env.create_symfloatnode(value.expr, hint=float(value.expr.xreplace(self.hints)))
        if isinstance(value, tuple):
            return tuple(self(v) for v in value)
        if isinstance(value, list):
            return [self(v) for v in value]
        return value


def decode(record: dict, model: nn.Module) -> fx.GraphModule:
    """The GraphModule ``record`` describes, its ``get_attr`` nodes bound to ``model``'s tensors."""
    if record.get("format") != FORMAT:
        raise CaptureCacheError(f"format {record.get('format')!r}, expected {FORMAT}")
    root = nn.Module()
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for attr, (kind, *rest) in record["attrs"].items():
        if kind == "model":
            name, is_param = rest
            value = params.get(name) if is_param else buffers.get(name)
            if value is None:
                raise CaptureCacheError(f"the model has no {'parameter' if is_param else 'buffer'} {name}")
            if is_param:
                root.register_parameter(attr, value)
            else:
                root.register_buffer(attr, value, persistent=False)
        else:
            c = rest[0]
            data = torch.frombuffer(bytearray(c.data), dtype=torch.uint8) if c.data else torch.empty(0, dtype=torch.uint8)
            root.register_buffer(attr, data.view(_resolve_const(c.dtype)).reshape(c.shape).clone(), persistent=False)
    values = _Values(record["symbols"])
    graph = fx.Graph()
    nodes: list[fx.Node] = []
    for op, name, target, args, kwargs, meta in record["nodes"]:
        args, kwargs = _decode_arg(args, nodes), _decode_arg(kwargs, nodes)
        if op == "output":
            node = graph.output(args[0])
        elif op in ("placeholder", "get_attr", "call_function"):
            node = graph.create_node(op, _resolve_target(target) if op == "call_function" else target,
                                     args, kwargs, name=name)
        else:
            raise CaptureCacheError(f"node kind {op!r}")
        node.meta.update({k: v for k, v in meta.items() if k != "val"})
        if "val" in meta:
            node.meta["val"] = values(meta["val"])
        nodes.append(node)
    graph.lint()
    gm = fx.GraphModule(root, graph)
    gm.meta.update(record["meta"])
    return gm


# ---------------------------------------------------------------- files


def path_for(model: nn.Module) -> Path | None:
    where = cache_location()
    return None if where is None else where / f"{type(model).__name__}-{cache_key(model)}.pkl"


def save(gm: fx.GraphModule, model: nn.Module, path: Path) -> None:
    """Write ``gm``'s records to ``path`` whole (temporary file, then rename)."""
    data = pickle.dumps(encode(gm, model), protocol=pickle.HIGHEST_PROTOCOL)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, model: nn.Module) -> fx.GraphModule:
    """The cached graph at ``path`` bound to ``model``; raises `CaptureCacheError` if it cannot be used."""
    try:
        record = _RecordUnpickler(io.BytesIO(path.read_bytes())).load()
        return decode(record, model)
    except CaptureCacheError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read means: capture again
        raise CaptureCacheError(f"{type(e).__name__}: {e}") from e


def cached_capture(model: nn.Module, announce=None) -> fx.GraphModule:
    """`capture(model)`, read from the cache when an entry for this model's structure exists, else
    captured (``announce()`` is called first: the slow path) and stored for later processes."""
    from .capture import capture

    path = path_for(model)
    if path is not None and path.is_file():
        try:
            with default_frequencies_for_dynamic(model):  # bind the frequencies the capture was made with
                return load(path, model)
        except CaptureCacheError as e:
            notice(f"the cached capture {path} cannot be used ({str(e)[:200]}); capturing again")
    if announce is not None:
        announce(path)
    gm = capture(model)
    if path is not None:
        try:
            save(gm, model, path)
        except Exception as e:  # noqa: BLE001 - the cache must never cost a build: go on uncached
            notice(f"could not cache the capture in {path.parent} ({type(e).__name__}: {str(e)[:200]}); "
                   "the next process captures again")
    return gm


__all__ = ["CaptureCacheError", "cache_key", "cached_capture", "cache_location", "decode", "encode", "load", "path_for", "save"]
