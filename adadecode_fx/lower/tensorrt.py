"""TensorRT lowering through torch-tensorrt (CUDA only).

Same shape as the inductor lowering: identical decoder layers share one engine-backed template with
their weights as inputs, and T (block length) and S (attended K/V length) are dynamic. We compile with
``torch.compile(backend="tensorrt")`` so that the segments keep writing K/V in place (torch-tensorrt
falls back to PyTorch for ops it cannot convert, e.g. the in-place ``index_copy_``), and reuse the
inductor lowering's layout normalisation so shapes and strides do not trigger rebuilds.

Untested here: the machines this project runs on have no CUDA GPU. On CPU the error says so.
"""
from __future__ import annotations

import torch

from ..errors import AdaDecodeError, MissingPackageError


def check_available(device) -> None:
    if not torch.cuda.is_available():
        raise AdaDecodeError("backend='tensorrt' needs a CUDA GPU and none is visible; use backend='inductor' "
                             "(CPU or GPU) or backend='onnxruntime'")
    if torch.device(device).type != "cuda":
        raise AdaDecodeError(f"backend='tensorrt' needs the model on a CUDA device, it is on {device}: "
                             "call model.to('cuda') first")
    try:
        import torch_tensorrt  # noqa: F401  (registers the "tensorrt" dynamo backend)
    except ImportError as e:
        raise MissingPackageError("backend='tensorrt' needs torch-tensorrt: pip install 'adadecode-fx[tensorrt]'") from e


def lower_tensorrt(program, config):
    first = program.layer_fns[0]
    device = next(iter([*first.parameters(), *first.buffers()])).device
    check_available(device)
    from . import inductor

    def compile_trt(fn, _config):
        return torch.compile(fn, backend="tensorrt", dynamic=True,
                             options={"truncate_double": True, "min_block_size": 1})

    return inductor.lower_with(program, config, compile_trt, name="tensorrt")
