#!/usr/bin/env python
"""AdaDecode vs Hugging Face decoding in one process (same as `adadecode bench`; see adadecode_fx/bench.py).

Example:
    python bench/run_bench.py --model smollm2-135m --task humaneval --n 5 --max-new-tokens 64 \
        --dtype bf16 --json out/bench_smol.json --plot out/bench_smol.png
"""
import sys

from adadecode_fx.bench import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
