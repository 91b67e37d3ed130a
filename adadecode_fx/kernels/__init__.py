"""CPU kernels that keep AdaDecode's blocks exact: `block_linear` (block_linear.cpp for AVX2 CPUs,
block_linear_avx512.cpp for AVX-512 BF16 CPUs, where ATen's bf16 linears run on oneDNN).

Built on first use with the local C++ compiler (torch's JIT extension loader, cached under
``TORCH_EXTENSIONS_DIR``), then checked bit for bit against ATen's own linear on data that tells
summation orders apart. Any failure (no compiler, another CPU, a torch or oneDNN whose order differs)
leaves `block_linear_op()` returning ``None`` and `block_linear_status()` saying why; callers then keep
ATen.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..notices import notice

_LOCK = threading.Lock()
_STATE: dict = {}
# oneDNN takes a bf16 matmul only above this many multiply-adds (ATen's `mkldnn_gemm_min_size`);
# smaller one-row linears run on ATen's own kernel, whose order the AVX-512 kernel does not reproduce
_ONEDNN_MIN_SIZE = 16 * 16 * 16


@dataclass(frozen=True)
class _Variant:
    """One kernel source and the linears whose one-row ATen result it reproduces."""
    name: str
    source: str
    cflags: tuple[str, ...]
    k_multiple: int
    min_kn: int = 0

    def fits(self, weight: torch.Tensor) -> bool:
        n, k = weight.shape
        return weight.dtype == torch.bfloat16 and k % self.k_multiple == 0 and n * k > self.min_kn


_AVX2 = _Variant("adadecode_block_linear", "block_linear.cpp", ("-O3", "-mavx2", "-mfma"), 64)
_AVX512 = _Variant("adadecode_block_linear_avx512", "block_linear_avx512.cpp",
                   ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"), 32,
                   _ONEDNN_MIN_SIZE)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _variant() -> tuple[_Variant | None, str]:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX2":
        return _AVX2, ""
    if capability == "AVX512":
        # ATen's bf16 linears go to oneDNN here; its one-row order is vdpbf16ps in 512-element K blocks
        if "avx512_bf16" not in _cpu_flags():
            return None, "AVX-512 without avx512_bf16: oneDNN emulates bf16 there in an order not reproduced"
        if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return None, "oneDNN (mkldnn) is off, so ATen's bf16 order is its own, not reproduced"
        return _AVX512, ""
    return None, f"ATen runs with CPU capability {capability}; the kernel reproduces AVX2 and AVX-512 BF16 orders"


def _build():
    if os.environ.get("ADADECODE_KERNELS", "1") == "0":
        return None, None, "disabled by ADADECODE_KERNELS=0"
    variant, why = _variant()
    if variant is None:
        return None, None, why
    try:
        from torch.utils.cpp_extension import load
        if not _built(variant.name):
            notice("building the bf16 block_linear kernel with the C++ compiler (about 20 s); cached under "
                   "~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR) for later runs")
        # -fopenmp: ATen's parallel_for is a header-inlined `#pragma omp parallel`; without it the kernel
        # runs on one thread (the OpenMP runtime itself is torch's, already loaded)
        load(name=variant.name, sources=[str(Path(__file__).with_name(variant.source))],
             extra_cflags=[*variant.cflags, "-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001  (no compiler, no ninja, headers missing...: keep ATen)
        return None, None, f"building the kernel failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    op = torch.ops.adadecode_kernels.block_linear.default
    torch.library.register_fake("adadecode_kernels::block_linear")(_fake)
    torch.library.register_autograd("adadecode_kernels::block_linear", linear_backward, setup_context=save_linear_inputs)
    problem = _self_check(op, variant)
    return (None, None, problem) if problem else (op, variant, "ok")


def _built(name: str) -> bool:
    """Whether torch's extension cache already holds the compiled kernel (loading it then takes a moment)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # noqa: BLE001  (a private torch helper; without it, announce the build anyway)
        return False


def _fake(x, w, b=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def save_linear_inputs(ctx, inputs, output):
    x, w, b = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = b is not None


def linear_backward(ctx, grad):
    """The gradients of ``x @ w.T + b`` for the exact linears (ATen's matmuls, not order-exact: training
    heads through a bf16 program needs gradients, not bit parity; without this autograd drops them)."""
    x, w = ctx.saved_tensors
    gx = grad @ w if ctx.needs_input_grad[0] else None
    gw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb


def _self_check(op, variant: _Variant) -> str | None:
    gen = torch.Generator().manual_seed(0)
    # odd output counts leave one output outside the two-halves pairing (AVX2) or fill part of a panel
    # (AVX-512); the last two are long blocks, which the AVX2 kernel tiles (a prompt's prefill)
    for n, k, bias, m in ((96, 128, True, 7), (200, 192, False, 7), (64, 896, True, 7), (300, 896, True, 1),
                          (97, 896, False, 1), (101, 128, True, 3), (40, 896, True, 61), (24, 4864, False, 9)):
        w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
        b = (torch.randn(n, generator=gen) * 0.1).bfloat16() if bias else None
        x = torch.randn(1, m, k, generator=gen).bfloat16()
        if not torch.equal(op(x, w, b), rows_alone(x, w, b)):
            return f"block_linear disagrees with ATen's bf16 linear (shape {n}x{k}): ATen's order changed"
    if variant is _AVX512:
        # random data hides most order differences in the bf16 rounding; a +B ... -B pair around the sum
        # makes every output depend on the exact order (docs/kernels.md)
        for n, k, bias, batch, m in ((896, 896, True, 1, 5), (128, 896, True, 1, 3), (4864, 896, False, 1, 2),
                                     (896, 4864, False, 1, 7), (70, 1536, True, 1, 1), (200, 576, False, 2, 3)):
            x, w, b = cancelling(n, k, batch, m, bias, gen)
            if not torch.equal(op(x, w, b), rows_alone(x, w, b)):
                return (f"block_linear disagrees with oneDNN's one-row bf16 order (shape {n}x{k}, batch {batch}): "
                        "this torch/oneDNN sums in another order")
    return None


def rows_alone(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """ATen's result for each row of ``x [..., K]`` computed alone, as decoding its prompt alone, one
    position at a time, computes it (a batch row included)."""
    rows = x.reshape(-1, x.shape[-1])
    return torch.cat([F.linear(rows[r:r + 1], w, b) for r in range(rows.shape[0])]).view(*x.shape[:-1], w.shape[0])


def cancelling(n: int, k: int, batch: int, m: int, bias: bool, gen: torch.Generator, big: float = 2.0 ** 20):
    """bf16 (x, w, b) whose outputs are small sums after a +big at k = 0 and a -big at k = K-1: any change
    in the order or grouping of the sum changes the rounded result."""
    w = torch.randn(n, k, generator=gen, dtype=torch.bfloat16)  # bf16 directly: LM heads are large
    x = torch.randn(batch, m, k, generator=gen, dtype=torch.bfloat16)
    w[:, 0], w[:, -1], x[..., 0], x[..., -1] = big, -big, 1.0, 1.0
    b = (torch.randn(n, generator=gen) * 30).bfloat16() if bias else None
    return x, w, b


def block_linear_op():
    """The checked ``adadecode_kernels::block_linear`` op, or None (see `block_linear_status`)."""
    with _LOCK:
        if "op" not in _STATE:
            _STATE["op"], _STATE["variant"], _STATE["status"] = _build()
        return _STATE["op"]


def block_linear_fits(weight: torch.Tensor) -> bool:
    """Whether the built kernel reproduces ATen's one-row result for this ``[N, K]`` weight.

    On AVX-512 each new shape is also checked once (per thread count) against ATen on cancelling data:
    oneDNN picks its blocking per shape, cache and thread count, so a shape the self-check did not cover
    could be summed in another order on another machine. Such a shape keeps the exact one-row fallback."""
    if block_linear_op() is None or not _STATE["variant"].fits(weight):
        return False
    if _STATE["variant"] is not _AVX512:
        return True
    key = (*weight.shape, torch.get_num_threads())
    checked = _STATE.setdefault("shapes", {})
    if key not in checked:
        # each row is a draw of its own: cancelling data shows an order difference for most draws, not all
        # (2 x 2048, where oneDNN splits K across threads, passed 4 rows once and failed another draw)
        with torch.no_grad():
            x, w, _ = cancelling(weight.shape[0], weight.shape[1], 1, 8, False, torch.Generator().manual_seed(1))
            checked[key] = torch.equal(_STATE["op"](x, w, None), rows_alone(x, w, None))
    return checked[key]


def prefill_switch():
    """The kernel's switch for a prompt's prefill (then it runs ATen's one call), or None if it has none."""
    if block_linear_op() is None or _STATE["variant"] is not _AVX512:
        return None
    return torch.ops.adadecode_kernels.set_prefill.default


def kernel_threads() -> int:
    """Threads one of our kernels' parallel loops really runs on (0 when the kernel is unavailable)."""
    return int(torch.ops.adadecode_kernels.parallel_threads()) if block_linear_op() is not None else 0


def block_linear_status() -> str:
    block_linear_op()
    return _STATE["status"]
