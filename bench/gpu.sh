#!/usr/bin/env bash
# The GPU checks of the cudagraphs backend, in one call of at most ~8 minutes. UNTESTED: written on a machine
# without a GPU. Run from the repository root on the GPU machine, after bench/gpu_wheels.sh filled .gpu/wheels
# here:   run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=540)
# Writes into $OUT (the folder that comes back; out/gpu when unset): machine.txt, install.txt, tests.txt,
# bench.json, bench.txt. Each phase has its own time limit, so one that hangs cannot take the others' time.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
start=$SECONDS
PY=${PY:-python3}
SITE=/tmp/adadecode-site  # the carried wheels go here, ahead of the image's packages on PYTHONPATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -V; nproc; } > "$OUT/machine.txt" 2>&1
# --no-deps into a folder of our own: the image's torch, tokenizers, huggingface-hub and numpy stay as they are
$PY -m pip install -q --no-index --no-deps --target "$SITE" .gpu/wheels/*.whl > "$OUT/install.txt" 2>&1
echo "install rc=$?" >> "$OUT/install.txt"
$PY -c "import torch, transformers, pytest; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'pytest', pytest.__version__, torch.cuda.get_device_name())" \
    >> "$OUT/machine.txt" 2>&1
echo "setup done at $((SECONDS - start)) s" | tee -a "$OUT/machine.txt"

# 1. correctness: fp32 graphs == our eager path token for token, nothing captured after warm-up, bf16 runs;
#    and the older CUDA tests, since the decode loop now walks runs of layers
timeout 170 $PY -m pytest -v -p no:logging -p no:cacheprovider tests/lower/test_cudagraphs.py -k test_cuda_ \
    tests/runtime/test_cuda.py > "$OUT/tests.txt" 2>&1
echo "tests rc=$? at $((SECONDS - start)) s" | tee -a "$OUT/tests.txt"

# 2. speed: HF eager greedy, HF static cache + compile, AdaDecode cudagraphs (eager on one prompt), bf16,
#    Qwen2.5-Coder-0.5B's shape with random weights replaying the schedule recorded on the real model
timeout 270 $PY bench/gpu_bench.py --json "$OUT/bench.json" --deadline 200 > "$OUT/bench.txt" 2>&1
echo "bench rc=$? at $((SECONDS - start)) s" | tee -a "$OUT/bench.txt"
tail -n 6 "$OUT/bench.txt"
