"""The custom ops AdaDecode's graphs call, in one place below passes, runtime and lowerings.

- `attention`: ``adadecode::row_exact_sdpa`` (a block of decode rows attends exactly as each row alone)
  and the `prefill_block` switch that lets a prompt's prefill run as one call.
- `experts`: ``adadecode::row_exact_grouped_mm`` (a mixture-of-experts layer multiplies each decode row
  alone, as one-position decoding does).
- `linear`: ``adadecode_kernels::block_linear`` (bf16 CPU linear whose blocks are cheap and exact; the
  C++ kernel is built by `adadecode_fx.kernels`).

Passes rewrite graphs to call these ops; the runtime flips `prefill_block`; lowerings call the op bodies
directly or map them back to plain ATen ops for exporters that do not know them.
"""
from .attention import ROW_EXACT, SDPA, plain_attention, prefill_block, row_exact, row_exact_sdpa
from .experts import ROW_EXACT_GROUPED, plain_experts, row_exact_grouped, row_exact_grouped_mm
from .linear import LINEAR, block_linear_kernel, is_block_linear, plain_linear

__all__ = ["ROW_EXACT", "SDPA", "plain_attention", "prefill_block", "row_exact", "row_exact_sdpa",
           "ROW_EXACT_GROUPED", "plain_experts", "row_exact_grouped", "row_exact_grouped_mm",
           "LINEAR", "block_linear_kernel", "is_block_linear", "plain_linear"]
