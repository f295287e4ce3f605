#!/usr/bin/env bash
# Wheels of everything .venv holds except torch (and its own dependencies), for a GPU machine that has torch
# and CUDA but no internet: `pip install --no-deps wheels/*.whl` there. DeepSpeed is built pure Python
# (DS_BUILD_OPS=0): the trainer compiles none of its ops, so no nvcc is needed here or there.
#     tools/build_wheels.sh [--all] [OUT_DIR]      (default: wheels/)
# Without --all, what training, conversion and bench/gpu_check.py import (~60 MB): not the corpus builder's
# `datasets` stack (pyarrow, pandas), the reports' matplotlib, or pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
all=0
if [ "${1:-}" = "--all" ]; then all=1; shift; fi
out=${1:-wheels}
mkdir -p "$out"
# torch, and what a CUDA torch brings itself (sympy, networkx, jinja2, filelock, fsspec, triton, nvidia-*)
skip='^(torch|triton|nvidia-.*|sympy|mpmath|networkx|jinja2|markupsafe|filelock|fsspec|typing-extensions|cherry-megatron'
if [ $all = 0 ]; then
  skip+='|datasets|pyarrow|pandas|multiprocess|dill|xxhash|tzdata|python-dateutil|matplotlib|pillow|fonttools|contourpy'
  skip+='|kiwisolver|cycler|pyparsing|pytest|pytest-timeout|pluggy|iniconfig|pyflakes|hf-xet'
fi
skip+=')=='
.venv/bin/pip freeze --exclude-editable | sed 's/_/-/g' | tr 'A-Z' 'a-z' | grep -Ev "$skip" > "$out/requirements.txt"
DS_BUILD_OPS=0 .venv/bin/pip wheel --no-deps -w "$out" -r "$out/requirements.txt"
.venv/bin/pip wheel --no-deps --no-build-isolation -w "$out" .
rm -rf build  # setuptools' staging dir of the wheel above
echo "$(ls "$out"/*.whl | wc -l) wheels in $out, $(du -sh "$out" | cut -f1)"
