"""``adadecode bench``: AdaDecode against what a user would pick instead, in one process.

`runner` (the interleaved run), `command` (its command line), `methods` (each way of decoding, timed alike),
`report` (summaries, JSON, table, plot), `batch` (throughput at batch sizes > 1).
"""
from .command import add_arguments, cli_main, main
from .runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "add_arguments", "cli_main", "main", "run_bench"]
