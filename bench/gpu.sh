#!/usr/bin/env bash
# The GPU checks of the cudagraphs backend, in one call of at most ~9 minutes (20 s + 330 s + 200 s).
# Ran on an H200 on 2026-11-30 (docs/gpu.md, "What the GPU run found"): bench 175 s, the tests ~170 s. Run from the repository root on the GPU machine, after bench/gpu_wheels.sh filled
# .gpu/wheels here:
#     run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=560)
# A dry run of its flow on a CPU: GPU_BENCH_ARGS="--device cpu --prompts 1 --max-new-tokens 16" bash bench/gpu.sh
# Writes into $OUT (the folder that comes back; out/gpu when unset): machine.txt, install.txt, bench.json,
# bench.txt, tests.txt. The bench runs first (it is the figure the GPU is lent for); each phase has its own
# time limit, so one that hangs cannot take the other's time.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
start=$SECONDS
PY=${PY:-python3}
SITE=/tmp/adadecode-site  # the carried wheels go here, ahead of the image's packages on PYTHONPATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD"

# the tree arrives without .git: bench/gpu_wheels.sh wrote the commit it was prepared at
export ADADECODE_COMMIT="$(cat .gpu/commit 2>/dev/null)"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -V; nproc; echo "commit $ADADECODE_COMMIT"; } \
    > "$OUT/machine.txt" 2>&1
# --no-deps into a folder of our own: the image's torch, tokenizers, huggingface-hub and numpy stay as they are
$PY -m pip install -q --no-index --no-deps --target "$SITE" .gpu/wheels/*.whl > "$OUT/install.txt" 2>&1
echo "install rc=$?" >> "$OUT/install.txt"
$PY -c "import torch, transformers, pytest; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'pytest', pytest.__version__, torch.cuda.get_device_name())" \
    >> "$OUT/machine.txt" 2>&1
echo "setup done at $((SECONDS - start)) s" | tee -a "$OUT/machine.txt"

# 1. speed: HF eager greedy, HF static cache + compile, AdaDecode cudagraphs with ATen's kernels and with
#    inductor's (compile_segments, built after the first prompt is timed), each also at full depth (the same
#    graphs without exit heads: what the exits buy), bf16, Qwen2.5-Coder-0.5B's shape
#    with random weights replaying the schedule recorded on the real model. No AdaDecode variant starts
#    building after 200 s, no prompt after 280 s (the first always runs); the JSON is rewritten after
#    every prompt.
METHODS=hf_greedy,hf_static_compile,adadecode_cudagraphs,adadecode_cudagraphs_full_depth
METHODS+=,adadecode_cudagraphs_inductor,adadecode_cudagraphs_inductor_full_depth
timeout 330 $PY bench/gpu_bench.py --json "$OUT/bench.json" --deadline 280 --build-deadline 200 \
    --methods "$METHODS" ${GPU_BENCH_ARGS:-} \
    > "$OUT/bench.txt" 2>&1
echo "bench rc=$? at $((SECONDS - start)) s" | tee -a "$OUT/bench.txt"
tail -n 9 "$OUT/bench.txt"

# 2. correctness: fp32 graphs == our eager path token for token (ATen's and inductor's kernels), nothing
#    captured or compiled after warm-up, bf16 runs; and the older CUDA tests, since the decode loop walks
#    runs of layers
# (no plugin autoloading: the image has pytest-xdist, -cov, -timeout and -benchmark for its own pytest, and
# the carried pytest 9.2 stands ahead of it; on the H200 they took ~170 s, 38 s of it inductor's compiles)
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 200 $PY -m pytest -v -p no:logging -p no:cacheprovider tests/lower/test_cudagraphs.py -k test_cuda_ \
    tests/runtime/test_cuda.py > "$OUT/tests.txt" 2>&1
echo "tests rc=$? at $((SECONDS - start)) s" | tee -a "$OUT/tests.txt"
tail -n 3 "$OUT/tests.txt"
