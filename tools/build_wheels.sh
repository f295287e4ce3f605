#!/usr/bin/env bash
# Wheels of everything .venv holds except torch (and its own dependencies), for a GPU machine that has torch
# and CUDA but no internet: `pip install --no-deps wheels/*.whl` there. DeepSpeed is built pure Python
# (DS_BUILD_OPS=0): the trainer compiles none of its ops, so no nvcc is needed here or there.
#     tools/build_wheels.sh [OUT_DIR]      (default: wheels/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-wheels}
mkdir -p "$out"
# torch, and what a CUDA torch brings itself (sympy, networkx, jinja2, filelock, fsspec, triton, nvidia-*)
skip='^(torch|triton|nvidia-.*|sympy|mpmath|networkx|jinja2|markupsafe|filelock|fsspec|typing-extensions|cherry-megatron)=='
.venv/bin/pip freeze --exclude-editable | sed 's/_/-/g' | tr 'A-Z' 'a-z' | grep -Ev "$skip" > "$out/requirements.txt"
DS_BUILD_OPS=0 .venv/bin/pip wheel --no-deps -w "$out" -r "$out/requirements.txt"
.venv/bin/pip wheel --no-deps --no-build-isolation -w "$out" .
echo "$(ls "$out"/*.whl | wc -l) wheels in $out"
