"""block_linear: bit-identical to ATen's one-row bf16 linear, whatever the block size."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adadecode_fx.kernels import block_linear_op, block_linear_status, kernel_threads

AVX2 = torch.backends.cpu.get_cpu_capability() == "AVX2"
needs_kernel = pytest.mark.skipif(not AVX2 or shutil.which("c++") is None,
                                  reason="the kernel reproduces ATen's AVX2 order and needs a C++ compiler")


@needs_kernel
def test_builds_and_passes_self_check():
    assert block_linear_op() is not None, block_linear_status()
    assert block_linear_status() == "ok"


@needs_kernel
def test_runs_on_every_torch_thread():
    # without -fopenmp, ATen's header-inlined parallel_for ran the kernel on one thread: blocks then cost
    # ~1.5x one ATen row instead of ~1x (docs/kernels.md)
    before = torch.get_num_threads()
    try:
        for n in {1, 2, before}:
            torch.set_num_threads(n)
            assert kernel_threads() == n
    finally:
        torch.set_num_threads(before)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), k64=st.integers(1, 12), m=st.integers(1, 11), bias=st.booleans(),
       seed=st.integers(0, 1000), scale=st.sampled_from([1e-3, 0.05, 3.0]))
def test_rows_equal_one_row_aten(n, k64, m, bias, seed, scale):
    op = block_linear_op()
    g = torch.Generator().manual_seed(seed)
    k = 64 * k64
    w = (torch.randn(n, k, generator=g) * scale).bfloat16()
    b = (torch.randn(n, generator=g) * scale).bfloat16() if bias else None
    x = torch.randn(1, m, k, generator=g).bfloat16()
    rows = torch.cat([F.linear(x[:, i:i + 1], w, b) for i in range(m)], dim=1)
    assert torch.equal(op(x, w, b), rows)


@needs_kernel
@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 120), k64=st.sampled_from([1, 14, 76]), m=st.integers(12, 150), bias=st.booleans(),
       seed=st.integers(0, 1000))
def test_long_blocks_are_tiled_and_still_equal_one_row_aten(n, k64, m, bias, seed):
    # a prefill's block is cut into row and output tiles (K = 896: 26 rows; K = 4864: 4 rows per tile)
    op = block_linear_op()
    g = torch.Generator().manual_seed(seed)
    k = 64 * k64
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = (torch.randn(n, generator=g) * 0.1).bfloat16() if bias else None
    x = torch.randn(1, m, k, generator=g).bfloat16()
    rows = torch.cat([F.linear(x[:, i:i + 1], w, b) for i in range(m)], dim=1)
    assert torch.equal(op(x, w, b), rows)


@needs_kernel
def test_refuses_what_it_cannot_do():
    op = block_linear_op()
    with pytest.raises(RuntimeError, match="multiple of 64"):
        op(torch.zeros(2, 96).bfloat16(), torch.zeros(8, 96).bfloat16(), None)
    with pytest.raises(RuntimeError, match="bf16"):
        op(torch.zeros(2, 64), torch.zeros(8, 64), None)


def test_disabled_by_environment(monkeypatch):
    from adadecode_fx import kernels
    monkeypatch.setattr(kernels, "_STATE", {})
    monkeypatch.setenv("ADADECODE_KERNELS", "0")
    assert kernels.block_linear_op() is None
    assert "ADADECODE_KERNELS=0" in kernels.block_linear_status()
