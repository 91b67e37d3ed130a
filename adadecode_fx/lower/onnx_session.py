"""ONNX Runtime plumbing that both halves of the ``onnxruntime`` backend share.

The export side (`adadecode_fx.lower.onnx_export`) runs every file it writes once in an ORT session to
check it against its FX segment; the runtime side (`adadecode_fx.lower.onnxrt`) runs every segment of a
decode in one. Both need the same optional-dependency check, the same fp32-only rule and the same
session setup, so they live here rather than on either side.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import AdaDecodeError, MissingPackageError

SUPPORTED_DTYPES = ("float32",)


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


class OrtSession:
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


__all__ = ["OrtSession", "SUPPORTED_DTYPES", "check_dtype", "default_providers", "default_session_options",
           "require_onnx"]
