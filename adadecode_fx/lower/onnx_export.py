"""Export of a `DecodeProgram` to an ONNX directory: one checked ``.onnx`` file per segment + a manifest.

Layout of an export directory (``adadecode export --format onnx --out DIR``)::

    DIR/manifest.json       format, model fingerprint, layer count, exit layers, K/V shapes, dtype, eos ids,
                            the decode config, each segment's file and input/output names, the layer recipes
    DIR/prologue.onnx       embeddings, rotary tables, mask          (inputs with dynamic T and S)
    DIR/layer_{i}.onnx      one decoder layer                        (returns its present K/V rows)
    DIR/epilogue.onnx       final norm + LM head
    DIR/exit_probe_{l}.onnx adapter + (shortlist) head -> (token, confidence)
    DIR/heads/              the exit heads (`ExitHeads.save`), when exported with heads
    (+ ``*.onnx.data`` external weight files)

Each segment is exported with ``torch.onnx.export`` (dynamo) on real example inputs recorded from the
eager program, after the graph rewrites of `adadecode_fx.lower.onnx_rewrite` (K/V returned as present
rows instead of written in place). Exporting is slow, so decoder layers that differ only in weight
values are *cloned*: the file of the first layer with the same structure is written again with this
layer's weights (``optimize=False`` keeps every weight a named initializer, which is what makes that
possible). Every file, exported or cloned, is run once in ONNX Runtime and compared with its FX segment
before it counts (a clone that fails is exported instead). The manifest is written last (atomically),
so a directory with a manifest is a complete export; reading it back is `adadecode_fx.lower.onnxrt`.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from torch import fx

from ..errors import AdaDecodeError, UnsupportedModelError
from . import onnx_rewrite
from .onnx_rewrite import onnx_ready_copy, node_role, present_kv_layer, slim_prologue
from .onnx_session import OrtSession, check_dtype, default_session_options, require_onnx

FORMAT = "adadecode-fx/onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# example sizes used for export: distinct primes, so no dynamic size can be confused with another
_T, _S, _C = 5, 13, 17


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

    def recorder(name, fn):
        def call(*args):
            calls[name] = args
            return fn(*args)
        return call

    recording = program.replace(prologue_fn=recorder("prologue", program.prologue_fn),
                                layer_fns=[recorder(f"layer_{i}", f) for i, f in enumerate(program.layer_fns)],
                                epilogue_fn=recorder("epilogue", program.epilogue_fn))
    with torch.no_grad():
        pro = recording.prologue(top)
        hidden = recording.embeddings(pro, _T)
        for i in range(recording.num_layers):
            hidden = recording.layer(i, hidden, pro, top, kv)
        recording.epilogue(hidden)
    calls["probe"] = (hidden[:, -1:].contiguous(),)
    calls["buffers"] = state.buffers
    return calls


def _dims(ph, symbols: dict) -> dict:
    """Dynamic dims of an input from its placeholder's fake value: ``symbols`` names some (the block
    length -> "T"; the batch -> None, exported as the example's 1), any other symbol is the K/V length "S"."""
    val = ph.meta.get("val")
    out = {}
    for d, size in enumerate(getattr(val, "shape", ())):
        if isinstance(size, torch.SymInt):
            expr = str(size.node.expr)
            if not size.node.expr.is_symbol:
                raise UnsupportedModelError(f"input {ph.name} has a computed size {expr}; cannot export it")
            name = symbols.get(expr, "S")
            if name is not None:
                out[d] = name
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

    graph, outs = onnx_ready_copy(sub)
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
            role = node_role(node)
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
        session = OrtSession(ort, path, ["CPUExecutionProvider"], default_session_options(ort))
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


def program_digest(program) -> str:
    """A digest of everything an export of ``program`` holds: the code of each segment and probe, each
    tensor they read (by value), and the versions of torch and of the code that writes it. Two programs
    with one digest export to the same files, so a directory whose manifest records it can be reused."""
    import onnx

    gm = program.gm
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{FORMAT}/{FORMAT_VERSION} torch {torch.__version__} onnx {onnx.__version__}".encode())
    for path in (Path(__file__), Path(onnx_rewrite.__file__)):
        h.update(path.read_bytes())
    for name, module in gm.named_modules():
        if isinstance(module, fx.GraphModule):
            h.update(f"{name}\n{module.code}".encode())
    first: dict[int, str] = {}
    tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    for name, t in tensors:
        seen = first.setdefault(id(t), name)
        h.update(f"{name} {seen} {tuple(t.shape)} {t.dtype}".encode())
        if seen == name:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def write_program(program, out_dir, meta: dict | None = None, log=None) -> dict:
    """Export every segment of ``program`` (eager FX segments) to ``out_dir``, each checked against its
    FX segment on example inputs; write the manifest last. Returns the manifest."""
    require_onnx()
    gm = program.gm
    if gm is None:
        raise AdaDecodeError("this program has no FX graph to export (it was loaded from an export already)")
    if any(s != l for l, s in enumerate(program.kv_sources)):
        raise UnsupportedModelError(
            "the ONNX export keeps one K/V buffer per layer, and this model's layers share K/V across layers "
            "(num_kv_shared_layers); decode it with backend='eager', 'inductor' or 'cudagraphs'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()  # a half-rewritten directory must not look complete
    dtype = check_dtype(next(iter(gm.parameters())).dtype)
    block = {gm.meta["block_symbol"]: "T", gm.meta.get("batch_symbol"): None}  # one sequence per engine
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
                 ("hidden_in" if node_role(p)[0] == "residual" else p.name) for k, p in enumerate(ph)]
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
        "max_positions": program.max_positions, "full_depth_positions": sorted(program.full_depth_positions),
        "prologue_args": list(program.prologue_args), "embedding_index": program.embedding_index,
        "layer_recipes": [[list(_listify(item)) for item in r] for r in program.layer_recipes],
        "segments": segments, "export_seconds": round(time.perf_counter() - started, 2),
        "exported_segments": how["exported"], "cloned_segments": how["cloned"], "torch": torch.__version__,
        "program_digest": program_digest(program),
        **(meta or {}),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    return manifest


def _listify(x):
    return [_listify(y) for y in x] if isinstance(x, (list, tuple)) else x


__all__ = ["program_digest", "write_program", "FORMAT", "FORMAT_VERSION", "MANIFEST"]
