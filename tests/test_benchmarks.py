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
    assert {("W5", p) for p in ("hf", "reference", "fast", "fast-buckets")} <= got
    assert all(r["value"] > 0 and 0 < r["of_ceiling"] for r in rows)
    assert all(r["x_hf"] == 1 for r in rows if r["provider"] == "hf")
    assert (tmp_path / "embed.md").read_text().strip() == table


def test_bench_search_small(tmp_path):
    _script("bench_search").main(["--n", "3000", "--d", "32", "--q", "1", "5", "-k", "7", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "search.jsonl").read_text().splitlines()]
    assert {(r["provider"], r["Q"]) for r in rows} == {(p, q) for p in ("torch", "streamed") for q in (1, 5)}
