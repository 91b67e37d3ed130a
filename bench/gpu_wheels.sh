#!/usr/bin/env bash
# Fill .gpu/wheels (git-ignored) with what bench/gpu.sh installs on the GPU machine, whose image has torch 2.11
# and transformers 5.17 on Python 3.12 and cannot reach a package index: transformers 5.24 (the version this
# project is tested with) and regex (which it needs and the image lacked), plus pytest and its small
# dependencies in case the image has none. Run here, on the CPU machine, before the GPU call; about 15 MB.
set -euo pipefail
dest=${1:-.gpu/wheels}
mkdir -p "$dest"
common=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 -d "$dest")
pip download -q "${common[@]}" --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    transformers==5.24.0 regex==2026.11.19
pip download -q "${common[@]}" --platform any pytest==9.2.0 pluggy iniconfig pygments packaging 2>/dev/null \
    || pip download -q --no-deps --only-binary=:all: -d "$dest" pytest==9.2.0 pluggy iniconfig pygments packaging
# the commit these checks run (the GPU machine gets the working tree without .git); "+changes": uncommitted edits
echo "$(git rev-parse HEAD)$([ -n "$(git status --porcelain --untracked-files=no)" ] && echo +changes)" > .gpu/commit
ls -l "$dest"
du -sh "$dest"
