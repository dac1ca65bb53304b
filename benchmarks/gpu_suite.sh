#!/usr/bin/env bash
# Every GPU benchmark in one call (installs nothing; a few minutes on an H100/H200).
# Usage: benchmarks/gpu_suite.sh OUT_DIR      (run from the repository root)
set -euo pipefail
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}
mkdir -p "$out"
# rematch_fast.kernels is the top-level kernels/ folder mapped by setup.py: the package must be installed
# (pip install --no-deps --no-build-isolation -e .), a bare PYTHONPATH cannot map it.
python3 -c "import rematch_fast.kernels" 2>/dev/null || { echo "install rematch_fast first: pip install --no-deps --no-build-isolation -e ."; exit 2; }
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
status=0
# one failing benchmark must not hide the others' numbers
python3 benchmarks/bench_pooling.py --gpu --out "$out" > "$out/pooling.log" 2>&1 || { status=1; tail -20 "$out/pooling.log"; }
python3 benchmarks/bench_search.py --gpu --out "$out" > "$out/search.log" 2>&1 || { status=1; tail -20 "$out/search.log"; }
for part in pooling search; do
    echo; echo "## $part"; grep '^#' "$out/$part.log" || true; cat "$out/$part.md" 2>/dev/null || echo "(no table)"
done
exit $status
