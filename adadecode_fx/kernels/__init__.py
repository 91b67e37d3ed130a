"""CPU kernels that keep AdaDecode's blocks exact: `block_linear` (see block_linear.cpp).

Built on first use with the local C++ compiler (torch's JIT extension loader, cached under
``TORCH_EXTENSIONS_DIR``), then checked bit for bit against ATen's own linear on random data. Any
failure (no compiler, another CPU capability, a torch whose reduction order differs) leaves
`block_linear_op()` returning ``None`` and `block_linear_status()` saying why; callers then keep ATen.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from ..notices import notice

_LOCK = threading.Lock()
_NAME = "adadecode_block_linear"
_STATE: dict = {}


def _build():
    if os.environ.get("ADADECODE_KERNELS", "1") == "0":
        return None, "disabled by ADADECODE_KERNELS=0"
    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        # ATen's bf16 dot product reduces over 8 float lanes under AVX2; other capabilities use other orders
        return None, f"ATen runs with CPU capability {torch.backends.cpu.get_cpu_capability()}, not AVX2"
    try:
        from torch.utils.cpp_extension import load
        if not _built():
            notice("building the bf16 block_linear kernel with the C++ compiler (about 20 s); cached under "
                   "~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR) for later runs")
        # -fopenmp: ATen's parallel_for is a header-inlined `#pragma omp parallel`; without it the kernel
        # runs on one thread (the OpenMP runtime itself is torch's, already loaded)
        load(name=_NAME, sources=[str(Path(__file__).with_name("block_linear.cpp"))],
             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001  (no compiler, no ninja, headers missing...: keep ATen)
        return None, f"building the kernel failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    op = torch.ops.adadecode_kernels.block_linear.default
    torch.library.register_fake("adadecode_kernels::block_linear")(_fake)
    problem = _self_check(op)
    return (None, problem) if problem else (op, "ok")


def _built() -> bool:
    """Whether torch's extension cache already holds the compiled kernel (loading it then takes a moment)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return (Path(_get_build_directory(_NAME, verbose=False)) / f"{_NAME}.so").is_file()
    except Exception:  # noqa: BLE001  (a private torch helper; without it, announce the build anyway)
        return False


def _fake(x, w, b=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _self_check(op) -> str | None:
    gen = torch.Generator().manual_seed(0)
    # odd output counts leave one output outside the two-halves pairing; the last two are long blocks,
    # which the kernel tiles (a prompt's prefill)
    for n, k, bias, m in ((96, 128, True, 7), (200, 192, False, 7), (64, 896, True, 7), (300, 896, True, 1),
                          (97, 896, False, 1), (101, 128, True, 3), (40, 896, True, 61), (24, 4864, False, 9)):
        w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
        b = (torch.randn(n, generator=gen) * 0.1).bfloat16() if bias else None
        x = torch.randn(1, m, k, generator=gen).bfloat16()
        rows = torch.cat([F.linear(x[:, i:i + 1], w, b) for i in range(x.shape[1])], dim=1)
        if not torch.equal(op(x, w, b), rows):
            return f"block_linear disagrees with ATen's bf16 linear (shape {n}x{k}): ATen's order changed"
    return None


def block_linear_op():
    """The checked ``adadecode_kernels::block_linear`` op, or None (see `block_linear_status`)."""
    with _LOCK:
        if "op" not in _STATE:
            _STATE["op"], _STATE["status"] = _build()
        return _STATE["op"]


def kernel_threads() -> int:
    """Threads one of our kernels' parallel loops really runs on (0 when the kernel is unavailable)."""
    return int(torch.ops.adadecode_kernels.parallel_threads()) if block_linear_op() is not None else 0


def block_linear_status() -> str:
    block_linear_op()
    return _STATE["status"]
