"""``adadecode bench``: AdaDecode against what a user would pick instead, in one process.

`runner` (the interleaved run and its command line), `methods` (each way of decoding, timed alike),
`report` (summaries, JSON, table, plot), `batch` (throughput at batch sizes > 1).
"""
from .runner import BenchConfig, add_arguments, cli_main, main, run_bench

__all__ = ["BenchConfig", "add_arguments", "cli_main", "main", "run_bench"]
