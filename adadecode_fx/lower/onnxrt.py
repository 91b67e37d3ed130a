"""ONNX Runtime lowering: every segment of a `DecodeProgram` exported to ONNX and run by ORT sessions.

Layout of an export directory (``adadecode export --format onnx --out DIR``)::

    DIR/manifest.json       format, model fingerprint, layer count, exit layers, K/V shapes, dtype, eos ids,
                            the decode config, each segment's file and input/output names, the layer recipes
    DIR/prologue.onnx       embeddings, rotary tables, mask          (inputs with dynamic T and S)
    DIR/layer_{i}.onnx      one decoder layer                        (returns its present K/V rows)
    DIR/epilogue.onnx       final norm + LM head
    DIR/exit_probe_{l}.onnx adapter + (shortlist) head -> (token, confidence)
    DIR/heads/              the exit heads (`ExitHeads.save`), when exported with heads
    (+ ``*.onnx.data`` external weight files)

K/V in the exported layers. The FX layer writes its new K/V rows into the K/V buffer *in place*
(``index_copy_`` at ``cache_position``); ONNX has no in-place update of a graph input, and the exporter
silently drops one. So before export each layer graph is rewritten (`present_kv_layer`):

- each K/V input is the *whole* K/V buffer of the generation (``[1, H, C, D]``, C = capacity), passed
  zero-copy; a ``kv_len`` input of shape ``[S]`` (only its length is read) says how much of it attention
  reads, as the view ``[:, :, :S]`` did;
- the write becomes the out-of-place ``index_copy`` that attention reads, and the rows written
  (``[1, H, T, D]``) are returned as extra outputs ``present_{i}_0`` / ``present_{i}_1``.

The ORT layer wrapper then copies those T rows into the caller's K/V views at the block's positions,
so every layer callable behaves exactly like the FX segment (returns ``(hidden,)``, K/V updated in place)
and the decode loop is unchanged. Returning only the new rows (not the updated ``[1, H, S, D]`` buffer)
keeps the copy-back O(T) instead of O(S) per layer.
"""
from __future__ import annotations

import json
import operator
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import fx

from ..errors import AdaDecodeError, MissingPackageError, UnsupportedModelError

FORMAT = "adadecode-fx/onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUPPORTED_DTYPES = ("float32",)
# example sizes used for export: distinct primes, so no dynamic size can be confused with another
_T, _S, _C = 5, 13, 17
aten = torch.ops.aten


def require_onnx():
    """Import onnxruntime (and check onnx + onnxscript, which the exporter needs); clear error if missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise MissingPackageError(
            f"the onnxruntime backend needs onnx, onnxscript and onnxruntime ({getattr(e, 'name', None) or e} is "
            "not installed): pip install 'adadecode-fx[onnx]' (or onnxruntime-gpu for the CUDA provider)") from e
    return onnxruntime


def check_dtype(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in SUPPORTED_DTYPES:
        raise AdaDecodeError(
            f"the onnxruntime backend runs float32 only (got {name}: ONNX Runtime's CPU provider has no "
            "bfloat16 kernels for most decoder ops); load the model in fp32 "
            "(adadecode_fx.models.load(..., dtype='fp32')) and export / decode in fp32")
    return name


# ------------------------------------------------------------------------------------------------------
# graph rewrites
# ------------------------------------------------------------------------------------------------------
def _role(node) -> tuple:
    return tuple(node.meta.get("role") or ("",))


def _copy_graph(sub: fx.GraphModule) -> tuple[fx.Graph, tuple]:
    graph = fx.Graph()
    env: dict = {}
    out = graph.graph_copy(sub.graph, env)
    return graph, (tuple(out) if isinstance(out, (tuple, list)) else (out,))


def present_kv_layer(sub: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
    """The layer graph with its in-place K/V writes made out-of-place (see the module doc).

    Returns the new GraphModule (inputs: the layer's inputs, each K/V one now the whole buffer, plus
    ``kv_len``; outputs: ``(hidden, rows of K, rows of V)``) and ``info``: for each K/V input, its
    position in the layer's arguments, its kind j, and the argument position of the write index.
    """
    graph, outs = _copy_graph(sub)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    kv = [p for p in placeholders if _role(p)[0] == "kv"]
    if not kv:
        raise UnsupportedModelError("layer segment has no K/V inputs labelled by explicit_kv")
    with graph.inserting_after(placeholders[-1]):
        kv_len = graph.placeholder("kv_len")
    with graph.inserting_after(kv_len):
        s = graph.call_function(aten.sym_size.int, (kv_len, 0))
    rows, info = [], []
    cursor = s
    for ph in sorted(kv, key=lambda p: _role(p)[2]):
        with graph.inserting_after(cursor):
            full_len = graph.call_function(aten.sym_size.int, (ph, 2))
        with graph.inserting_after(full_len):
            fits = graph.call_function(operator.le, (s, full_len))
        with graph.inserting_after(fits):
            check = graph.call_function(torch._check, (fits,))
        with graph.inserting_after(check):
            view = graph.call_function(aten.slice.Tensor, (ph, 2, 0, s))
        cursor = view
        ph.replace_all_uses_with(view, delete_user_cb=lambda u: u not in (view, full_len))
        writes = [u for u in view.users if u.op == "call_function" and u.args and u.args[0] is view
                  and u.target in (aten.index_copy_.default, aten.index_put_.default, aten.copy_.default)]
        if len(writes) != 1 or writes[0].target is not aten.index_copy_.default or writes[0].args[1] not in (2, -2):
            raise UnsupportedModelError(
                f"layer K/V input {ph.name} is written by {[w.target for w in writes]}; the ONNX export "
                "supports exactly one index_copy_ along the sequence dim (what adadecode_fx.capture produces)")
        write = writes[0]
        index = write.args[2]
        if index.op != "placeholder":
            raise UnsupportedModelError(f"the K/V write index of {ph.name} is computed inside the layer; "
                                        "expected the cache_position input")
        with graph.inserting_before(write):
            new = graph.call_function(aten.index_copy.default, tuple(write.args))
        order = {n: k for k, n in enumerate(graph.nodes)}
        for user in list(view.users):  # reads after the write see the written buffer
            if user is not write and user is not new and order[user] > order[write]:
                user.replace_input_with(view, new)
        rows.append(write.args[3])
        write.replace_all_uses_with(new)
        graph.erase_node(write)
        info.append({"arg": placeholders.index(ph), "kind": _role(ph)[2], "index_arg": placeholders.index(index)})
    if any(not isinstance(r, fx.Node) for r in rows):
        raise AssertionError("lost a K/V write source")
    graph.output(tuple(outs) + tuple(rows))
    graph.eliminate_dead_code()
    gm = fx.GraphModule(sub, graph)
    gm.graph.lint()
    return gm, {"kv": info}


def slim_prologue(sub: fx.GraphModule, keep: list[int]) -> tuple[fx.GraphModule, dict]:
    """The prologue reading only the *length* of K/V (``kv_len [S]`` instead of a K/V buffer) and returning
    only the outputs in ``keep`` (layers never read its SymInt outputs; ONNX cannot return them)."""
    graph, outs = _copy_graph(sub)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    sized = [p for p in placeholders if _role(p)[0] == "kv_size"]
    info = {"kv_size_args": [placeholders.index(p) for p in sized]}
    if sized:
        with graph.inserting_before(sized[0]):
            kv_len = graph.placeholder("kv_len")
        for ph in sized:
            for user in list(ph.users):
                if user.target is not aten.sym_size.int or user.args[1] not in (2, -2):
                    raise UnsupportedModelError(f"the prologue reads K/V buffer {ph.name} other than its length")
                user.args = (kv_len, 0)
            graph.erase_node(ph)
    graph.output(tuple(outs[k] for k in keep))
    graph.eliminate_dead_code()
    gm = fx.GraphModule(sub, graph)
    gm.graph.lint()
    return gm, info


# ------------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------------
def _example_calls(program) -> dict:
    """Run one block of ``_T`` tokens at positions ``_S-_T .. _S-1`` over K/V buffers of capacity ``_C``
    through the eager program and record every segment's arguments (consistent, real example inputs)."""
    from ..runtime.kv_state import KVState

    w = next(iter(program.layer_fns[0].parameters()), None)
    if w is None:
        w = next(iter(program.layer_fns[0].buffers()))
    state = KVState(program.kv_shapes, _C, w.dtype, w.device, 1)
    kv = state.views(_S)
    top = program.top_inputs([1] * _T, _S - _T, kv)
    calls: dict = {}
    saved = (program.prologue_fn, list(program.layer_fns), program.epilogue_fn)

    def recorder(name, fn):
        def call(*args):
            calls[name] = args
            return fn(*args)
        return call

    try:
        program.prologue_fn = recorder("prologue", saved[0])
        program.layer_fns = [recorder(f"layer_{i}", f) for i, f in enumerate(saved[1])]
        program.epilogue_fn = recorder("epilogue", saved[2])
        with torch.no_grad():
            pro = program.prologue(top)
            hidden = program.embeddings(pro, _T)
            for i in range(program.num_layers):
                hidden = program.layer(i, hidden, pro, top, kv)
            program.epilogue(hidden)
    finally:
        program.prologue_fn, program.layer_fns, program.epilogue_fn = saved
    calls["probe"] = (hidden[:, -1:].contiguous(),)
    calls["buffers"] = state.buffers
    return calls


def _dims(ph, block_symbol: str) -> dict:
    """Dynamic dims of an input from its placeholder's fake value: the block length -> T, any other
    symbol (the K/V length) -> S."""
    val = ph.meta.get("val")
    out = {}
    for d, size in enumerate(getattr(val, "shape", ())):
        if isinstance(size, torch.SymInt):
            expr = str(size.node.expr)
            if not size.node.expr.is_symbol:
                raise UnsupportedModelError(f"input {ph.name} has a computed size {expr}; cannot export it")
            out[d] = "T" if expr == block_symbol else "S"
    return out


def _dim_objects():
    D = torch.export.Dim
    return {"T": D("T", min=1, max=1 << 16), "S": D("S", min=1, max=1 << 17), "C": D("C", min=1, max=1 << 17)}


def _export(module, args, input_names, dims, output_names, path: Path) -> None:
    dim_obj = _dim_objects()
    dynamic = tuple({d: dim_obj[n] for d, n in spec.items()} or None for spec in dims)
    try:
        # optimize=False keeps every weight an initializer named after its attribute (the optimizer would
        # fold transposes into anonymous constants), which is what lets identical layers be cloned.
        # ORT's own graph optimizer does the folding at session creation.
        program = torch.onnx.export(module, tuple(args), dynamo=True, input_names=list(input_names),
                                    output_names=list(output_names), dynamic_shapes=dynamic, optimize=False,
                                    verbose=False, report=False)
    except Exception as e:
        raise UnsupportedModelError(
            f"torch.onnx.export failed for {path.stem} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "use backend='eager' or 'inductor' for this model") from e
    _save(program.model_proto, path)


def _save(model, path: Path) -> None:
    import onnx

    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def _clone(template: Path, path: Path, tensors: dict) -> bool:
    """Write ``template`` again with the initializers named in ``tensors`` replaced (same names, shapes
    and dtypes). False if the template does not hold exactly those weights as initializers."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(template), load_external_data=True)
    seen = set()
    for init in model.graph.initializer:
        if init.name in tensors:
            value = tensors[init.name].detach().cpu().contiguous().numpy()
            if tuple(init.dims) != value.shape:
                return False
            init.CopyFrom(numpy_helper.from_array(value, init.name))
            seen.add(init.name)
    if seen != set(tensors):
        return False
    _save(model, path)
    return True


def _canonical(sub: fx.GraphModule) -> tuple[fx.GraphModule, dict, str]:
    """``sub`` with its weights renamed ``p0, p1, ...`` in order of use, the weights by new name, and a
    structural signature: two layers with the same signature differ only in weight values."""
    from torch.fx.node import map_aggregate

    graph, outs = _copy_graph(sub)
    graph.output(outs if len(outs) != 1 else (outs[0],))
    root = torch.nn.Module()
    tensors, sig, index = {}, [], {}
    for k, node in enumerate(graph.nodes):
        index[node] = k
        if node.op == "get_attr":
            value = getattr(sub, node.target)
            name = f"p{len(tensors)}"
            if isinstance(value, torch.nn.Parameter):
                root.register_parameter(name, torch.nn.Parameter(value.detach(), requires_grad=False))
            else:
                root.register_buffer(name, value)
            tensors[name] = value
            node.target = name
            sig.append(("get_attr", tuple(value.shape), str(value.dtype)))
        elif node.op == "placeholder":
            role = _role(node)
            sig.append(("placeholder", node.name if role[0] not in ("kv", "residual") else "", role[:1] + role[2:]))
        else:
            args = map_aggregate((node.args, node.kwargs), lambda a: ("%", index[a]) if isinstance(a, fx.Node) else a)
            sig.append((node.op, str(node.target), repr(args)))
    gm = fx.GraphModule(root, graph)
    return gm, tensors, repr(sig)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b.to(a.dtype)))
    scale = float(a.abs().max()) if a.numel() else 1.0
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4 * max(1.0, scale)))


def _verify(path: Path, args, expected) -> str | None:
    """Run the exported file once on ``args``; None if it reproduces ``expected``, else what differs."""
    ort = require_onnx()
    try:
        session = _Session(ort, path, ["CPUExecutionProvider"], default_session_options(ort))
        got = session.run([a.cpu() for a in args])
    except Exception as e:
        return f"ONNX Runtime failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    for k, (g, e) in enumerate(zip(got, expected)):
        if not _close(e.detach().cpu(), g):
            return f"output {k} differs from the FX segment (max abs diff {float((g.float() - e.float().cpu()).abs().max()):.3g})"
    return None


def _export_checked(module, args, names, dims, outs, path: Path, template=None, tensors=None) -> str:
    """Clone ``template`` (if given) or export ``module``; check the file against the FX module on the
    example ``args``. Returns how the file was made ("cloned" / "exported")."""
    with torch.no_grad():
        expected = module(*args)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    if template is not None and _clone(template, path, tensors) and _verify(path, args, expected) is None:
        return "cloned"
    _export(module, args, names, dims, outs, path)
    problem = _verify(path, args, expected)
    if problem:
        raise UnsupportedModelError(f"the ONNX export of {path.stem} is wrong: {problem}; use backend='eager' "
                                    "or 'inductor' for this model")
    return "exported"


def write_program(program, out_dir, meta: dict | None = None, log=None) -> dict:
    """Export every segment of ``program`` (eager FX segments) to ``out_dir``, each checked against its
    FX segment on example inputs; write the manifest last. Returns the manifest."""
    require_onnx()
    gm = program.gm
    if gm is None:
        raise AdaDecodeError("this program has no FX graph to export (it was loaded from an export already)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()  # a half-rewritten directory must not look complete
    dtype = check_dtype(next(iter(gm.parameters())).dtype)
    block = gm.meta["block_symbol"]
    calls = _example_calls(program)
    segments, started = {}, time.perf_counter()
    how = {"exported": 0, "cloned": 0}

    def done(name, kind):
        how[kind] += 1
        if log:
            log(f"{kind} {name} ({time.perf_counter() - started:.1f} s)")

    # prologue: only the outputs a layer reads (or the embeddings)
    used = {program.embedding_index}
    for recipe in program.layer_recipes:
        for item in recipe:
            if item[0] in ("positional", "shared") and item[1][0] == "pro":
                used.add(item[1][1])
            if item[0] == "residual" and item[1] is not None:
                used.add(item[1])
    keep = sorted(used)
    pro_gm, pro_info = slim_prologue(gm.prologue, keep)
    pro_ph = [n for n in pro_gm.graph.nodes if n.op == "placeholder"]
    sized = set(pro_info["kv_size_args"])
    args = [a for k, a in enumerate(calls["prologue"]) if k not in sized]
    if sized:
        args.insert(min(sized), torch.zeros(_S, dtype=torch.uint8))
    names = [p.name for p in pro_ph]
    dims = [{0: "S"} if p.name == "kv_len" else _dims(p, block) for p in pro_ph]
    outs = [f"prologue_{k}" for k in keep]
    done("prologue", _export_checked(pro_gm, args, names, dims, outs, out / "prologue.onnx"))
    segments["prologue"] = {"file": "prologue.onnx", "inputs": names, "outputs": outs, "keep": keep,
                            "kv_size_args": sorted(sized)}

    templates: dict[str, Path] = {}
    for i in range(program.num_layers):
        lay_gm, info = present_kv_layer(getattr(gm, f"layer_{i}"))
        ph = [n for n in lay_gm.graph.nodes if n.op == "placeholder"]
        kv_args = {k["arg"]: k["kind"] for k in info["kv"]}
        names = [("past_key", "past_value")[kv_args[k]] if k in kv_args else
                 ("hidden_in" if _role(p)[0] == "residual" else p.name) for k, p in enumerate(ph)]
        args = [calls["buffers"][i][kv_args[k]] if k in kv_args else a
                for k, a in enumerate(calls[f"layer_{i}"])] + [torch.zeros(_S, dtype=torch.uint8)]
        dims = [{2: "C"} if k in kv_args else ({0: "S"} if p.name == "kv_len" else _dims(p, block))
                for k, p in enumerate(ph)]
        outs = ["hidden_out"] + [("present_key", "present_value")[k["kind"]] for k in info["kv"]]
        canon, tensors, sig = _canonical(lay_gm)
        path = out / f"layer_{i}.onnx"
        kind = _export_checked(canon, args, names, dims, outs, path, templates.get(sig), tensors)
        templates.setdefault(sig, path)
        segments[f"layer_{i}"] = {"file": path.name, "inputs": names, "outputs": outs, **info}
        done(f"layer_{i}", kind)

    epi_ph = [n for n in gm.epilogue.graph.nodes if n.op == "placeholder"]
    done("epilogue", _export_checked(gm.epilogue, calls["epilogue"], [p.name for p in epi_ph],
                                     [_dims(p, block) for p in epi_ph], ["logits"], out / "epilogue.onnx"))
    segments["epilogue"] = {"file": "epilogue.onnx", "inputs": [p.name for p in epi_ph], "outputs": ["logits"]}

    probe_template = None
    for l in program.exit_layers:
        probe = program.probe_fns[l]
        name = f"exit_probe_{l}"
        first = program.probe_fns[program.exit_layers[0]]
        same = probe.epilogue is first.epilogue and (probe.vocab is None) == (first.vocab is None)
        kind = _export_checked(probe, calls["probe"], ["hidden_last"], [{}], ["token", "confidence"],
                               out / f"{name}.onnx", probe_template if same else None, {"adapter": probe.adapter})
        probe_template = probe_template or out / f"{name}.onnx"
        segments[name] = {"file": f"{name}.onnx", "inputs": ["hidden_last"], "outputs": ["token", "confidence"]}
        done(name, kind)

    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "num_layers": program.num_layers, "exit_layers": list(program.exit_layers),
        "kv_shapes": [[list(k), list(v)] for k, v in program.kv_shapes],
        "vocab_size": gm.meta.get("vocab_size"), "model_class": gm.meta.get("model_class"), "dtype": dtype,
        "prologue_args": list(program.prologue_args), "embedding_index": program.embedding_index,
        "layer_recipes": [[list(_listify(item)) for item in r] for r in program.layer_recipes],
        "segments": segments, "export_seconds": round(time.perf_counter() - started, 2),
        "exported_segments": how["exported"], "cloned_segments": how["cloned"], "torch": torch.__version__,
        **(meta or {}),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    return manifest


def _listify(x):
    return [_listify(y) for y in x] if isinstance(x, (list, tuple)) else x


def export_onnx(model, heads=None, config=None, out_dir=None, log=None) -> Path:
    """Export ``model`` (+ exit ``heads``) as an AdaDecode program to ONNX in ``out_dir``; see module doc.

    ``config`` (an `AdaDecodeConfig`) fixes the exit layers, threshold and max_pending stored in the
    manifest (the defaults `load_exported` decodes with). Returns the directory.
    """
    from ..config import AdaDecodeConfig
    from ..heads import model_fingerprint
    from ..runtime.decoder import AdaDecoder

    require_onnx()
    if out_dir is None:
        raise AdaDecodeError("export_onnx needs out_dir: the directory to write the ONNX files to")
    check_dtype(model.get_input_embeddings().weight.dtype)
    config = config or AdaDecodeConfig()
    eager = AdaDecodeConfig(**{**config.__dict__, "backend": "eager"})
    decoder = AdaDecoder(model, heads, eager)
    cfg = decoder.config
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [int(eos)] if isinstance(eos, int) else (None if eos is None else [int(e) for e in eos])
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise AdaDecodeError(f"{out} exists and is not an adadecode ONNX export: choose an empty or new --out directory")
    meta = {"fingerprint": model_fingerprint(model), "eos_token_id": eos,
            "config": {"exit_layers": list(cfg.exit_layers), "threshold": cfg.threshold,
                       "max_pending": cfg.max_pending, "kv_bucket": cfg.kv_bucket, "dtype": cfg.dtype},
            "heads": None}
    if heads is not None:
        if (out / "heads").exists():
            shutil.rmtree(out / "heads")
        heads.save(out / "heads")
        meta["heads"] = "heads"
    write_program(decoder.program, out, meta, log=log)
    return out


# ------------------------------------------------------------------------------------------------------
# runtime
# ------------------------------------------------------------------------------------------------------
def default_providers(ort=None) -> list[str]:
    ort = ort or require_onnx()
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def default_session_options(ort=None):
    """One session per segment means dozens of ORT thread pools; spinning idle workers (ORT's default)
    would burn the cores the running segment (and PyTorch) need. So: no spinning."""
    ort = ort or require_onnx()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


_ORT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
              torch.int32: np.int32, torch.bool: np.bool_, torch.uint8: np.uint8}


class _Session:
    """One ORT session; ``run(tensors) -> tensors``. CPU: numpy views of the torch tensors in and out (no
    copies for contiguous inputs). CUDA: inputs bound by device pointer through IOBinding."""

    def __init__(self, ort, path: Path, providers, options):
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.cuda = providers[0] == "CUDAExecutionProvider"
        self.ort = ort

    def run(self, tensors) -> list[torch.Tensor]:
        if not self.cuda:
            feeds = {n: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
                     for n, t in zip(self.inputs, tensors)}
            return [torch.from_numpy(o) for o in self.session.run(self.outputs, feeds)]
        binding = self.session.io_binding()  # pragma: no cover - needs onnxruntime-gpu
        keep = []
        device = None
        for name, t in zip(self.inputs, tensors):
            t = torch.as_tensor(t)
            t = t.contiguous() if t.is_cuda else t.cuda().contiguous()
            keep.append(t)
            device = t.device
            binding.bind_input(name, "cuda", t.device.index or 0, _ORT_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        for name in self.outputs:
            binding.bind_output(name, "cuda", (device.index or 0) if device else 0)
        self.session.run_with_iobinding(binding)
        return [torch.from_dlpack(v) for v in binding.get_outputs()]


class _LenBuffer:
    """``kv_len`` inputs: zero-copy prefixes of one array (only their length matters)."""

    def __init__(self):
        self.buf = torch.zeros(1024, dtype=torch.uint8)

    def __call__(self, n: int, device=None) -> torch.Tensor:
        if n > self.buf.numel():
            self.buf = torch.zeros(max(n, 2 * self.buf.numel()), dtype=torch.uint8)
        return self.buf[:n]


def _whole_buffer(view: torch.Tensor) -> torch.Tensor:
    """The contiguous ``[1, H, C, D]`` K/V buffer that ``view = buffer[:, :, :S]`` was cut from (same
    storage, no copy); a contiguous copy of the view if it is not such a prefix."""
    if view.is_contiguous():
        return view
    b, h, s, d = view.shape
    st = view.stride()
    if st[3] == 1 and st[2] == d and st[1] % d == 0 and st[1] // d >= s and (b == 1 or st[0] == h * st[1]):
        try:
            whole = view.as_strided((b, h, st[1] // d, d), st)
            if whole.is_contiguous():
                return whole
        except RuntimeError:
            pass
    return view.contiguous()


class OrtPrologue:
    def __init__(self, session: _Session, spec: dict, n_outputs: int, lens: _LenBuffer):
        self.session, self.keep, self.lens = session, spec["keep"], lens
        self.sized = set(spec["kv_size_args"])
        self.n_outputs = n_outputs

    def __call__(self, *args):
        feeds = [a for k, a in enumerate(args) if k not in self.sized]
        if self.sized:
            feeds.insert(min(self.sized), self.lens(args[min(self.sized)].shape[2]))
        values = [None] * self.n_outputs
        for k, v in zip(self.keep, self.session.run(feeds)):
            values[k] = v
        return tuple(values)


class OrtLayer:
    """Same call as the FX layer segment: ``(*args) -> (hidden,)``, K/V views updated in place."""

    def __init__(self, session: _Session, spec: dict, lens: _LenBuffer):
        self.session, self.kv, self.lens = session, spec["kv"], lens
        self.kv_args = {k["arg"] for k in self.kv}

    def __call__(self, *args):
        s = args[self.kv[0]["arg"]].shape[2]
        feeds = [_whole_buffer(a) if k in self.kv_args else a for k, a in enumerate(args)]
        feeds.append(self.lens(s))
        hidden, *rows = self.session.run(feeds)
        for k, r in zip(self.kv, rows):
            view = args[k["arg"]]
            view.index_copy_(2, args[k["index_arg"]], r.to(view.device))
        return (hidden,)


class OrtSegment:
    def __init__(self, session: _Session):
        self.session = session

    def __call__(self, *args):
        return tuple(self.session.run(list(args)))


def load_manifest(path) -> dict:
    d = Path(path)
    f = d / MANIFEST
    if not d.is_dir():
        raise AdaDecodeError(f"{d} is not a directory: pass the --out directory written by `adadecode export --format onnx`")
    if not f.exists():
        raise AdaDecodeError(f"no {MANIFEST} in {d}: it is not a complete ONNX export (was the export interrupted?); "
                             "run `adadecode export --format onnx --out DIR` again")
    try:
        manifest = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise AdaDecodeError(f"{f} is not valid JSON ({e}); re-export with `adadecode export --format onnx`") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdaDecodeError(f"{f} is not an adadecode-fx ONNX manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}); "
                             "re-export with `adadecode export --format onnx`")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise AdaDecodeError(f"{d} was exported in format version {version!r}, this adadecode-fx reads version "
                             f"{FORMAT_VERSION}: re-export the model with this version (`adadecode export --format onnx`)")
    required = ["num_layers", "exit_layers", "kv_shapes", "vocab_size", "dtype", "prologue_args", "embedding_index",
                "layer_recipes", "segments"]
    missing = [k for k in required if k not in manifest]
    n = manifest.get("num_layers")
    segs = manifest.get("segments") or {}
    needed = ["prologue", "epilogue"] + [f"layer_{i}" for i in range(n if isinstance(n, int) else 0)] + \
             [f"exit_probe_{l}" for l in manifest.get("exit_layers") or ()]
    missing += [f"segments.{s}" for s in needed if s not in segs]
    if missing:
        raise AdaDecodeError(f"{f} is incomplete (missing {', '.join(missing)}); re-export with `adadecode export --format onnx`")
    gone = [segs[s]["file"] for s in needed if not (d / segs[s]["file"]).exists()]
    if gone:
        raise AdaDecodeError(f"{d} lacks segment files {gone[:4]}; copy the whole export directory or re-export")
    check_dtype(manifest["dtype"])
    return manifest


def load_program(path, providers=None, session_options=None):
    """A `DecodeProgram` whose segments are ORT sessions over the export in ``path``."""
    from ..runtime.program import DecodeProgram

    ort = require_onnx()
    d = Path(path)
    manifest = load_manifest(d)
    providers = list(providers or default_providers(ort))
    options = session_options or default_session_options(ort)
    segs = manifest["segments"]

    def session(name):
        try:
            return _Session(ort, d / segs[name]["file"], providers, options)
        except Exception as e:
            raise AdaDecodeError(f"ONNX Runtime could not load {d / segs[name]['file']} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); re-export the model") from e

    lens = _LenBuffer()
    n_pro = max(segs["prologue"]["keep"]) + 1
    program = DecodeProgram.from_parts(
        num_layers=manifest["num_layers"], exit_layers=manifest["exit_layers"], kv_shapes=manifest["kv_shapes"],
        prologue_fn=OrtPrologue(session("prologue"), segs["prologue"], n_pro, lens),
        prologue_args=manifest["prologue_args"],
        layer_fns=[OrtLayer(session(f"layer_{i}"), segs[f"layer_{i}"], lens) for i in range(manifest["num_layers"])],
        layer_recipes=manifest["layer_recipes"], embedding_index=manifest["embedding_index"],
        epilogue_fn=OrtSegment(session("epilogue")),
        probe_fns={l: OrtSegment(session(f"exit_probe_{l}")) for l in manifest["exit_layers"]})
    program.manifest = manifest
    program.providers = providers
    program.export_dir = d
    return program


def load_exported(path, providers=None, config=None, session_options=None):
    """An `AdaDecoder` that runs from an ONNX export directory alone (no torch model weights).

    ``config``: an `AdaDecodeConfig` overriding the manifest's threshold / max_pending / kv_bucket (its
    exit layers must be the exported ones, or empty). Token ids in, token ids out: tokenizing is yours.
    """
    from ..config import AdaDecodeConfig
    from ..heads import ExitHeads
    from ..runtime.decoder import AdaDecoder

    program = load_program(path, providers, session_options)
    m = program.manifest
    saved = dict(m.get("config") or {})
    cfg = dict(exit_layers=tuple(m["exit_layers"]), threshold=saved.get("threshold", 0.75),
               max_pending=saved.get("max_pending", 5), kv_bucket=saved.get("kv_bucket", 1))
    if config is not None:
        if config.exit_layers and tuple(config.exit_layers) != tuple(m["exit_layers"]):
            raise AdaDecodeError(f"this export has exit probes after layers {m['exit_layers']}, not "
                                 f"{list(config.exit_layers)}: re-export with --exit-layers to change them")
        cfg.update(threshold=config.threshold, max_pending=config.max_pending, kv_bucket=config.kv_bucket)
    config = AdaDecodeConfig(**cfg, dtype=m["dtype"], backend="onnxruntime").validate(m["num_layers"])
    heads = None
    if m.get("heads") and (Path(path) / m["heads"]).exists():
        heads = ExitHeads.load(Path(path) / m["heads"])
    device = torch.device("cuda" if program.providers[0] == "CUDAExecutionProvider" else "cpu")
    return AdaDecoder.from_program(program, heads, config, vocab_size=m["vocab_size"],
                                   eos_token_id=m.get("eos_token_id"), device=device,
                                   dtype=getattr(torch, m["dtype"]))


def lower_onnxruntime(program, config):
    """Backend ``onnxruntime`` for `AdaDecoder(model, heads, AdaDecodeConfig(backend="onnxruntime"))`:
    export the program's segments (to ``config.extra["onnx_dir"]`` if given, else a temporary directory
    removed with the program) and return the ORT-backed program."""
    require_onnx()
    check_dtype(config.dtype)
    target = (config.extra or {}).get("onnx_dir")
    out = Path(target) if target else Path(tempfile.mkdtemp(prefix="adadecode-onnx-"))
    meta = {"config": {"exit_layers": list(config.exit_layers), "threshold": config.threshold,
                       "max_pending": config.max_pending, "kv_bucket": config.kv_bucket, "dtype": config.dtype}}
    write_program(program, out, meta)
    lowered = load_program(out, providers=(config.extra or {}).get("onnx_providers"))
    lowered.gm = program.gm
    if not target:
        weakref.finalize(lowered, shutil.rmtree, str(out), True)
    return lowered


__all__ = ["export_onnx", "load_exported", "load_program", "load_manifest", "lower_onnxruntime",
           "present_kv_layer", "slim_prologue", "write_program", "require_onnx", "FORMAT", "FORMAT_VERSION"]
