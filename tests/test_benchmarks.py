"""The benchmark scripts run end to end on small CPU sizes (their numbers are not checked:
speed lives in benchmarks, not tests), and their tables hold every provider."""
import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))  # the scripts import their shared harness.py


def _script(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_embed_small(tmp_path):
    table = _script("bench_embed").main(["--model", "tiny", "--docs", "5", "--images", "2", "--iters", "1",
                                        "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "embed.jsonl").read_text().splitlines()]
    got = {(r["workload"], r["provider"]) for r in rows}
    for wl in ("W1", "W1e", "W2"):
        assert {(wl, p) for p in ("hf", "reference", "fast")} <= got
    assert {("W5", p) for p in ("hf", "reference", "fast", "fast-noshare", "fast-buckets")} <= got
    assert ("W1e", "fast-noshare") in got and {("W1", "fast-graphs"), ("W1e", "fast-graphs")} <= got
    assert all(r["value"] > 0 and 0 < r["of_ceiling"] for r in rows)
    assert all(r["x_hf"] == 1 for r in rows if r["provider"] == "hf")
    assert (tmp_path / "embed.md").read_text().strip() == table


def test_bench_embed_mlp_rows(tiny_paths):
    """The GPU-only MLP rows' code on the CPU (the three ways through the op sets' CPU paths): every
    variant at both token counts, each timed per call."""
    import torch
    from harness import Results

    from rematch_fast import ReMatch

    res = Results(None, "embed")
    fast = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], backend="fast")
    _script("bench_embed").mlp_kernels("tiny", fast, torch.float32, torch.device("cpu"), 1e11, res, repeat=2)
    assert {(r["provider"], r["items"]) for r in res.rows} == {
        (p, t) for p in ("gate/up GEMM", "GEMM then gate", "swiglu GEMM") for t in (8192, 64)}
    assert all(r["workload"] == "MLP" and r["unit"] == "ms" and r["value"] > 0 for r in res.rows)


def test_busy_fraction_counts_overlapping_kernels_once():
    import torch
    from harness import busy_fraction, union_length

    assert union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4  # [0, 3] and [5, 6]
    assert union_length([(0, 10), (2, 3)]) == 10 and union_length([]) == 0
    assert busy_fraction(lambda: None, torch.device("cpu")) is None  # the device's kernels: CUDA only


def test_bench_search_small(tmp_path):
    _script("bench_search").main(["--n", "3000", "--d", "32", "--q", "1", "5", "-k", "7", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "search.jsonl").read_text().splitlines()]
    assert {(r["provider"], r["Q"]) for r in rows} == {(p, q) for p in ("torch", "streamed", "faiss") for q in (1, 5)}
    assert all(r["corpus"].endswith("float32") for r in rows if r["provider"] == "faiss")  # the float corpus only


def test_gpu_suite_limits_each_part_and_goes_on(tmp_path):
    """A hanging part is killed at its own limit and a failing one reported; the others still run
    and print their tables. Checked with stand-ins for python3 and nvidia-smi."""
    import os
    import subprocess
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\n")
    (bin_dir / "python3").write_text(
        '#!/bin/bash\n'
        'case "$*" in\n'
        '  *bench_pooling*) echo "# pooling ran"; echo "| provider |" > "${@: -1}/pooling.md" ;;\n'
        '  *bench_search*) exec sleep 60 ;;\n'
        '  *bench_embed*) echo boom; exit 3 ;;\n'
        '  *bench_quant*) echo "| w6 |" > "${@: -1}/quant_w6.md"; echo "| model |" > "${@: -1}/quant_model.md" ;;\n'
        'esac\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LIMIT_SEARCH": "1"}
    start = time.monotonic()
    run = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), str(tmp_path / "out")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert run.returncode == 1, run.stdout + run.stderr
    assert "search: TIMED OUT after 1 s" in run.stdout
    assert "embed: failed with status 3" in run.stdout and "boom" in run.stdout
    assert "# pooling ran" in run.stdout and "| provider |" in run.stdout
    assert "| w6 |" in run.stdout and "| model |" in run.stdout  # a part's several tables
    only = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), str(tmp_path / "out2")], capture_output=True, text=True,
                          env={**env, "PARTS": "quant pooling"}, timeout=60, check=False)
    assert only.returncode == 0 and "## quant" in only.stdout and "## embed" not in only.stdout


def test_every_provider_is_timed_under_inference_mode():
    harness = _script("harness")
    import torch

    seen = []
    harness.interleaved_median_ms({"a": lambda: seen.append(torch.is_inference_mode_enabled()),
                                   "b": lambda: seen.append(torch.is_inference_mode_enabled())},
                                  torch.device("cpu"), iters=2, warmup=1)
    assert seen == [True] * 6


def test_bench_export_small(tmp_path):
    _script("bench_export").main(["--model", "tiny", "--texts", "4", "--iters", "1", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "export.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"torch-reference", "torch-fast", "onnx-fp32", "onnx-int8-dynamic",
                                             "onnx-int8-weight", "onnx-int8-qdq"}
    assert all(r["ms"] > 0 and r["cosine_min"] > (0.99 if "int8" in r["provider"] else 0.9999) for r in rows)


def test_bench_quant_small(tmp_path):
    bench = _script("bench_quant")
    bench.main(["--model", "tiny", "--rows", "1,5", "--texts", "3", "--iters", "1", "--out", str(tmp_path)])
    layer = [json.loads(line) for line in (tmp_path / "quant_w6.jsonl").read_text().splitlines()]
    model = [json.loads(line) for line in (tmp_path / "quant_model.jsonl").read_text().splitlines()]
    timed = [p for p in bench.presets(__import__("torch").device("cpu")) if p != "bf16"]
    assert "int8-weight" in timed and "fp8" not in timed  # fp8: its tensor cores only
    assert {(r["M"], r["preset"]) for r in layer} == {(m, p) for m in (1, 5) for p in ["base", *timed]}
    int8 = next(r for r in model if r["preset"] == "int8-weight")
    assert int8["of_base_bytes"] < 0.3 and int8["cosine_min"] > 0.99 and int8["W5_ms"] > 0
    if "bnb-nf4" in timed:
        nf4 = next(r for r in model if r["preset"] == "bnb-nf4")
        assert nf4["of_base_bytes"] < int8["of_base_bytes"] and nf4["cosine_min"] > 0.9


def test_bench_images_small(tmp_path):
    """C2 on every provider (outputs checked equal inside), the W2 / W2j stages on the tiny model."""
    _script("bench_images").main(["--iters", "1", "--threads", "2", "--out", str(tmp_path), "--small"])
    c2 = [json.loads(line) for line in (tmp_path / "images_c2.jsonl").read_text().splitlines()]
    w2 = [json.loads(line) for line in (tmp_path / "images_w2.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in c2} == {"transformers", "python", "native", "native uint8"}
    assert all(r["ms_1_thread"] > 0 and r["ms_per_image_n_threads"] > 0 for r in c2)
    whole = {r["workload"]: r for r in w2 if r["stage"].startswith("whole")}
    assert set(whole) == {"W2", "W2j"} and all(r["images_per_s"] > 0 for r in whole.values())
    assert {r["stage"] for r in w2 if r["workload"] == "W2j"} >= {"decode", "resize", "patches", "vision tower"}


def test_bench_corpus_small(tmp_path):
    """Every CPU part of the corpus benchmark, tiny: the stores it compares are byte-identical."""
    _script("bench_corpus").main(["--rows", "60,120", "--resume-rows", "160", "--resume-shard", "16",
                                  "--out", str(tmp_path)])
    rows = {r["part"]: r for r in map(json.loads, (tmp_path / "corpus.jsonl").read_text().splitlines())}
    assert set(rows) == {"scale", "resume", "workers", "rss growth"}
    assert rows["scale"]["rows"] == 120 and rows["scale"]["rows_per_s"] > 0 and rows["scale"]["peak_rss_mb"] > 0
    assert rows["resume"]["identical"] and rows["workers"]["identical"] and rows["workers"]["speedup"] > 0


def test_bench_match_small(tmp_path):
    _script("bench_match").main(["--model", "tiny", "--scale", "0.1", "--iters", "1", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "match.jsonl").read_text().splitlines()]
    got = {(r["workload"], r["provider"]) for r in rows}
    for wl in ("W3", "W3s"):
        assert {(wl, p) for p in ("hf-naive", "hf-prefix", "reference", "fast-noshare", "fast")} <= got
    assert {("W3f", p) for p in ("reference", "fast-noshare", "fast")} <= got
    assert all(r["ms"] > 0 and 0 < r["of_floor"] for r in rows)


def test_bench_pooling_small_and_its_tight_baseline(tmp_path):
    import torch

    from rematch_fast import ops

    bench = _script("bench_pooling")
    hidden = torch.randn(60, 24, generator=torch.Generator().manual_seed(2))
    rows = ops.learnable_rows_packed(torch.tensor([0, 20, 45, 60]), 4)
    for got, want in zip(bench.tight_torch_pooling(hidden, rows), ops.pool_learnable_torch(hidden, rows)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    bench.main(["--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "pooling.jsonl").read_text().splitlines()]
    assert rows and all(r["ms"] > 0 for r in rows)


def test_gpu_suite_runs_every_cuda_only_test():
    """Every test file that skips without a GPU is in `gpu_suite.sh --tests` (a whole file, or the
    named test), so a GPU run never leaves a CUDA-only test unrun."""
    import re

    args = [t.strip('"\'\\') for t in (BENCH / "gpu_suite.sh").read_text().split() if t.strip('"').startswith("tests/")]
    tests = BENCH.parent / "tests"
    for path in sorted(tests.rglob("test_*.py")):
        if path.parent.name == "bench":  # op micro-benchmarks: run on demand with --benchmark-only
            continue
        text = path.read_text()
        rel = path.relative_to(tests.parent).as_posix()
        skips = re.findall(r"skipif\(\s*not torch\.cuda\.is_available\(\)", text)
        if not skips:
            continue
        covered = any(rel == a or rel.startswith(a.rstrip("/") + "/") for a in args)  # the file, or its folder
        named = [a for a in args if a.startswith(rel + "::")]
        assert covered or named, f"{rel} has CUDA-only tests that gpu_suite.sh --tests does not run"
        if named and not covered:  # only some tests of the file: they must be all its CUDA-only ones
            assert len(named) >= len(skips), f"{rel}: gpu_suite.sh names {named}, the file has {len(skips)} CUDA skips"
