"""block_linear: bit-identical to ATen's one-row bf16 linear, whatever the block size, on the CPU kinds
it has a kernel for (AVX2; AVX-512 BF16, where ATen runs oneDNN)."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from adadecode_fx import kernels
from adadecode_fx.kernels import block_linear_op, block_linear_status, cancelling, kernel_threads, rows_alone
from adadecode_fx.ops.attention import prefill_block
from adadecode_fx.ops.linear import block_linear_kernel

VARIANT = kernels._variant()[0]
needs_kernel = pytest.mark.skipif(VARIANT is None or shutil.which("c++") is None,
                                  reason=f"no kernel for this CPU ({kernels._variant()[1]}) or no C++ compiler")
needs_avx512 = pytest.mark.skipif(VARIANT is not kernels._AVX512 or shutil.which("c++") is None,
                                  reason="the oneDNN-order kernel needs an AVX-512 BF16 CPU and a C++ compiler")


def _fits(n, k):
    return n * k > VARIANT.min_kn


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
@given(n=st.integers(1, 300), kmul=st.integers(1, 24), m=st.integers(1, 11), bias=st.booleans(),
       seed=st.integers(0, 1000), scale=st.sampled_from([1e-3, 0.05, 3.0]))
def test_rows_equal_one_row_aten(n, kmul, m, bias, seed, scale):
    k = VARIANT.k_multiple * kmul
    assume(_fits(n, k))
    op = block_linear_op()
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * scale).bfloat16()
    b = (torch.randn(n, generator=g) * scale).bfloat16() if bias else None
    x = torch.randn(1, m, k, generator=g).bfloat16()
    assert torch.equal(op(x, w, b), rows_alone(x, w, b))


@needs_kernel
@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 200), kmul=st.integers(1, 160), m=st.integers(1, 9), bias=st.booleans(),
       seed=st.integers(0, 1000))
def test_rows_equal_one_row_aten_where_the_order_shows(n, kmul, m, bias, seed):
    # a +2^20 ... -2^20 pair around each sum: any other grouping of the sum rounds differently, so this
    # fails for a kernel whose K blocks or pair order differ from ATen's (random data mostly would not)
    # Only shapes the model-shape check admits: oneDNN sums some shapes in another order (e.g. N <= 64
    # with K = 2048 on 2 threads, where it splits K across threads); those stay on the fallback, below.
    k = VARIANT.k_multiple * kmul
    assume(_fits(n, k) and k >= 64 and kernels.block_linear_fits(torch.empty(n, k, dtype=torch.bfloat16)))
    x, w, b = cancelling(n, k, 1, m, bias, torch.Generator().manual_seed(seed))
    assert torch.equal(block_linear_op()(x, w, b), rows_alone(x, w, b))


@needs_avx512
@pytest.mark.parametrize("n,k", [(8, 2048), (64, 2048), (65, 2048), (3, 4864), (896, 896), (16, 14336)])
def test_the_shape_check_admits_exactly_the_shapes_the_kernel_reproduces(n, k):
    # whatever oneDNN does on this machine (its blocking depends on shape, cache and thread count), a
    # shape the kernel gets wrong on cancelling data must be refused, and one it gets right admitted
    op = block_linear_op()
    exact = all(torch.equal(op(x, w, None), rows_alone(x, w, None))
                for x, w, _ in (cancelling(n, k, 1, 2, False, torch.Generator().manual_seed(s)) for s in (5, 6, 7)))
    assert kernels.block_linear_fits(torch.empty(n, k, dtype=torch.bfloat16)) == exact


@needs_kernel
@settings(max_examples=12, deadline=None)
@given(n=st.integers(8, 120), k64=st.sampled_from([1, 14, 76]), m=st.integers(12, 150), bias=st.booleans(),
       seed=st.integers(0, 1000))
def test_long_blocks_still_equal_one_row_aten(n, k64, m, bias, seed):
    # the AVX2 kernel cuts a long block (a prefill) into row and output tiles
    k = 64 * k64
    assume(_fits(n, k))
    op = block_linear_op()
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = (torch.randn(n, generator=g) * 0.1).bfloat16() if bias else None
    x = torch.randn(1, m, k, generator=g).bfloat16()
    assert torch.equal(op(x, w, b), rows_alone(x, w, b))


@needs_avx512
@pytest.mark.parametrize("bias", [False, True])
def test_a_batch_block_equals_each_row_alone(bias):
    # plain decoding of a batch runs one ATen call over the batch's rows per step, whose rounding depends
    # on the batch size; the kernel computes every row of a batch as that row alone, so a batch row
    # decodes as its prompt alone
    x, w, b = cancelling(896, 4864 // 2, 3, 4, bias, torch.Generator().manual_seed(0))
    assert torch.equal(block_linear_op()(x, w, b), rows_alone(x, w, b))
    x1 = x[:, :1]  # one decode step of the batch: [3, 1, K]
    assert torch.equal(block_linear_op()(x1, w, b), torch.cat([F.linear(x1[r], w, b)[None] for r in range(3)]))


@needs_avx512
def test_a_prefill_is_one_aten_call():
    block_linear_kernel()  # registers the kernel's prefill switch with prefill_block
    x, w, b = cancelling(896, 4864, 1, 9, True, torch.Generator().manual_seed(2))
    with prefill_block():
        assert torch.equal(block_linear_op()(x, w, b), F.linear(x, w, b))
    assert torch.equal(block_linear_op()(x, w, b), rows_alone(x, w, b))
    assert not torch.equal(F.linear(x, w, b), rows_alone(x, w, b))  # the two differ here: the test can fail


@needs_kernel
def test_refuses_what_it_cannot_do():
    op = block_linear_op()
    with pytest.raises(RuntimeError, match="multiple of"):
        op(torch.zeros(2, 100).bfloat16(), torch.zeros(8, 100).bfloat16(), None)
    with pytest.raises(RuntimeError, match="bf16"):
        op(torch.zeros(2, 64), torch.zeros(8, 64), None)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(kernels, "_STATE", {})
    monkeypatch.setenv("ADADECODE_KERNELS", "0")
    assert kernels.block_linear_op() is None
    assert "ADADECODE_KERNELS=0" in kernels.block_linear_status()


def test_off_on_avx512_without_bf16(monkeypatch):
    # oneDNN emulates bf16 on such CPUs in another order: no kernel, blocks run one row at a time
    monkeypatch.setattr(kernels.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx512f", "avx512bw"})
    assert kernels._variant()[0] is None and "avx512_bf16" in kernels._variant()[1]


@needs_avx512
def test_each_model_shape_is_checked_once_and_a_failing_one_keeps_the_fallback(monkeypatch):
    # oneDNN chooses its blocking per shape and thread count: a shape the kernel does not reproduce on
    # some machine must stay on the one-row fallback, not break parity
    monkeypatch.setitem(kernels._STATE, "shapes", {})
    w = torch.zeros(640, 1024, dtype=torch.bfloat16)
    assert kernels.block_linear_fits(w)
    real = kernels._STATE["op"]
    monkeypatch.setitem(kernels._STATE, "op", lambda x, w, b: real(x, w, b) + 1)  # a kernel that is wrong
    assert kernels.block_linear_fits(w)  # cached: checked once per shape
    assert not kernels.block_linear_fits(torch.zeros(640, 1056, dtype=torch.bfloat16))
    assert not kernels.block_linear_fits(torch.zeros(2, 64, dtype=torch.bfloat16))  # too small for oneDNN


@needs_kernel
def test_gradients_are_aten_linears():
    # heads train through the program's epilogue: without a backward the kernel would drop the gradients
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 256, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(96, 256, generator=gen) * 0.05).bfloat16().requires_grad_()
    b = torch.randn(96, generator=gen).bfloat16().requires_grad_()
    grad = torch.randn(2, 3, 96, generator=gen).bfloat16()
    block_linear_op()(x, w, b).backward(grad)
    ref = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    F.linear(*ref).backward(grad)
    for got, want in zip((x, w, b), ref):
        assert torch.equal(got.grad, want.grad)
