"""ONNX Runtime lowering: every segment of a `DecodeProgram` exported to ONNX and run by ORT sessions.

This module is the runtime half and the public face of the backend:

- `load_exported` / `load_program` / `load_manifest`: decode from an export directory alone (no torch
  weights), with the manifest checked for format, version and completeness first;
- `lower_onnxruntime`: backend ``onnxruntime`` of `AdaDecoder` (export to a directory, then load it);
- `OrtPrologue` / `OrtLayer` / `OrtSegment`: ORT sessions behind the same call signatures as the FX
  segments, so the decode loop does not know which backend runs. `OrtLayer` copies the present K/V
  rows the exported layer returns into the caller's K/V views (why: `adadecode_fx.lower.onnx_rewrite`).

Writing an export (directory layout, manifest, cloning identical layers) is
`adadecode_fx.lower.onnx_export`; the session setup both halves share is `adadecode_fx.lower.onnx_session`.
The names they define that callers use (`write_program`, `present_kv_layer`, `require_onnx`, ...) are
importable from here as well. Exporting a model (building its program first) is `adadecode_fx.export`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from ..errors import AdaDecodeError
from ..notices import notice
from .onnx_export import FORMAT, FORMAT_VERSION, MANIFEST, program_digest, write_program
from .onnx_rewrite import present_kv_layer, slim_prologue
from .onnx_session import (OrtSession, check_dtype, default_providers, default_session_options,
                           require_onnx)


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
    def __init__(self, session: OrtSession, spec: dict, n_outputs: int, lens: _LenBuffer):
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

    def __init__(self, session: OrtSession, spec: dict, lens: _LenBuffer):
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
    def __init__(self, session: OrtSession):
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
            return OrtSession(ort, d / segs[name]["file"], providers, options)
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
    device = torch.device("cuda" if providers[0] == "CUDAExecutionProvider" else "cpu")
    return program.replace(backend="onnxruntime", device=device, dtype=getattr(torch, manifest["dtype"]),
                           vocab_size=manifest["vocab_size"], eos_token_id=manifest.get("eos_token_id"),
                           max_positions=manifest.get("max_positions"),
                           full_depth_positions=frozenset(manifest.get("full_depth_positions", ())),
                           lowering={"manifest": manifest, "providers": providers, "export_dir": d})


def load_exported(path, providers=None, config=None, session_options=None):
    """An `AdaDecoder` that runs from an ONNX export directory alone (no torch model weights).

    ``config``: an `AdaDecodeConfig` overriding the manifest's threshold / max_pending / kv_bucket (its
    exit layers must be the exported ones, or empty). Token ids in, token ids out: tokenizing is yours.
    """
    from ..config import DEFAULT_MAX_PENDING, DEFAULT_THRESHOLD, AdaDecodeConfig
    from ..heads.format import ExitHeads
    from ..runtime.decoder import AdaDecoder

    program = load_program(path, providers, session_options)
    m = program.lowering["manifest"]
    saved = dict(m.get("config") or {})
    cfg = dict(exit_layers=tuple(m["exit_layers"]), threshold=saved.get("threshold", DEFAULT_THRESHOLD),
               max_pending=saved.get("max_pending", DEFAULT_MAX_PENDING), kv_bucket=saved.get("kv_bucket", 1))
    if config is not None:
        if config.exit_layers and tuple(config.exit_layers) != tuple(m["exit_layers"]):
            raise AdaDecodeError(f"this export has exit probes after layers {m['exit_layers']}, not "
                                 f"{list(config.exit_layers)}: re-export with --exit-layers to change them")
        cfg.update(max_pending=config.max_pending, kv_bucket=config.kv_bucket)
        if config.threshold is not None:
            cfg["threshold"] = config.threshold
    config = AdaDecodeConfig(**cfg, dtype=m["dtype"], backend="onnxruntime").validate(m["num_layers"])
    heads = None
    if m.get("heads") and (Path(path) / m["heads"]).exists():
        heads = ExitHeads.load(Path(path) / m["heads"])
    return AdaDecoder(program.replace(config=config, heads=heads))


def lower_onnxruntime(program, config):
    """Backend ``onnxruntime`` for `AdaDecoder(model, heads, AdaDecodeConfig(backend="onnxruntime"))`:
    export the program's segments and return the ORT-backed program. ``config.onnx_dir`` keeps the
    export, and a later construction whose program has the same digest (model weights, heads, exit
    layers, dtype, versions: `program_digest`) loads it instead of exporting again; without it the export
    goes to a temporary directory removed with the program."""
    require_onnx()
    check_dtype(config.dtype)
    target = config.onnx_dir
    out = Path(target) if target else Path(tempfile.mkdtemp(prefix="adadecode-onnx-"))
    if not (target and _holds_export_of(out, program)):
        notice("exporting every segment to ONNX for ONNX Runtime (about 15-20 s for a small model); "
               + (f"kept in {out} and reused while the model, heads and settings stay the same" if target else
                  "done for every new decoder unless AdaDecodeConfig(onnx_dir=...) keeps it"))
        meta = {"config": {"exit_layers": list(config.exit_layers), "threshold": config.threshold,
                           "max_pending": config.max_pending, "kv_bucket": config.kv_bucket, "dtype": config.dtype}}
        write_program(program, out, meta)
    ort_program = load_program(out, providers=config.onnx_providers)
    # the eager heads' logits stay, for sampling
    lowered = ort_program.replace(gm=program.gm, probe_modules=program.probe_modules, needs_warm_up=True,
                                  **{name: getattr(program, name) for name in program.MODEL_FIELDS})
    if not target:
        weakref.finalize(lowered, shutil.rmtree, str(out), True)
    return lowered


def _holds_export_of(path: Path, program) -> bool:
    """True if ``path`` holds a complete export whose manifest records ``program``'s digest."""
    try:
        recorded = load_manifest(path).get("program_digest")
    except AdaDecodeError:
        return False
    return recorded is not None and recorded == program_digest(program)


__all__ = ["load_exported", "load_program", "load_manifest", "lower_onnxruntime",
           "present_kv_layer", "slim_prologue", "write_program", "require_onnx", "FORMAT", "FORMAT_VERSION"]
