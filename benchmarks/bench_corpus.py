"""Corpus-scale embedding benchmark: `rematch-fast embed` as users run it (docs/benchmarks.md).

scale    short texts (4-16 words) through the command line, one process per size: embedding rows/s
         (the command's own figure, model loading excluded) and the process's peak RSS, at each of
         --rows (default 10,000, 100,000 and 200,000; target: RSS grows by at most 200 MB).
resume   a run of --resume-rows rows in shards of --resume-shard rows, killed (SIGKILL) once half
         its shards are written, then resumed: the time lost against one uninterrupted run, in
         shards' worth of work (target: at most one shard, beyond the second model load).
workers  the same corpus on 1 and 2 worker processes (wall time, model loads included).
gpu      (--gpu) W1-like ragged texts on the fast backend in bf16: the corpus job against the
         library's `encode` on the same texts in the same process (target: >= 0.9x).

    python benchmarks/bench_corpus.py --out results/            # CPU, tiny model (about 25 minutes on 2 cores)
    python benchmarks/bench_corpus.py --gpu --out results/      # adds the gpu row
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Results  # noqa: E402

WORDS = ("bread river stock moon garden engine violin harbour glacier market city paper lamp orbit "
         "salt winter copper theory signal forest").split()
# runs the command line and reports its peak RSS (KiB on Linux) after it returns
RUNNER = ("import json, resource, sys; from rematch_fast.cli import main; code = main(sys.argv[1:]); "
          "print(json.dumps({'code': code, 'maxrss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))")
SUMMARY = re.compile(r"embedded (\d+) rows .* \(([\d,.]+) rows/s\)")


def write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


def embed_cli(ckpt: Path, corpus: Path, out: Path, *extra: str) -> dict:
    """One `rematch-fast embed` in a fresh process: rows, embedding seconds, wall seconds, peak RSS."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUNNER, "embed", str(ckpt), str(corpus), "--out", str(out),
                           "--quiet", *extra], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines or json.loads(lines[-1])["code"] != 0:
        raise RuntimeError(f"embed failed: {done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rows, rate = SUMMARY.search(done.stdout).groups()  # the rate, unrounded where the seconds are rounded
    rows, rate = int(rows), float(rate.replace(",", ""))
    return {"rows": rows, "seconds": rows / rate, "wall_s": wall,
            "peak_rss_mb": json.loads(lines[-1])["maxrss_kib"] / 1024}


def scale(ckpt: Path, tmp: Path, sizes: list[int], record) -> None:
    corpus = write_corpus(tmp / "scale.jsonl", max(sizes))
    for n in sizes:
        part = tmp / f"scale_{n}.jsonl"
        with corpus.open() as src, part.open("w") as dst:
            for _ in range(n):
                dst.write(src.readline())
        got = embed_cli(ckpt, part, tmp / f"store_{n}")
        record("scale", rows=n, rows_per_s=got["rows"] / got["seconds"], peak_rss_mb=got["peak_rss_mb"])


def resume(ckpt: Path, tmp: Path, rows: int, shard: int, record) -> None:
    corpus = write_corpus(tmp / "resume.jsonl", rows, seed=1)
    args = ["--shard-rows", str(shard)]
    whole = embed_cli(ckpt, corpus, tmp / "whole", *args)
    out = tmp / "killed"
    shards = -(-rows // shard)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rematch_fast.cli", "embed", str(ckpt), str(corpus), "--out",
                             str(out), "--quiet", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / f"shard-{shards // 2:05d}.safetensors").exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_s = time.perf_counter() - t
    kept = len(list(out.glob("shard-*.safetensors")))
    again = embed_cli(ckpt, corpus, out, *args, "--resume")
    same = all((out / p.name).read_bytes() == p.read_bytes() for p in (tmp / "whole").glob("shard-*"))
    lost = killed_s + again["wall_s"] - whole["wall_s"]
    load = again["wall_s"] - again["seconds"]  # the resumed run's start: imports, model load, re-reading
    shard_s = whole["seconds"] / shards
    record("resume", rows=rows, shard_rows=shard, shards_kept=kept, of_shards=shards, lost_s=lost, load_s=load,
           shard_s=shard_s, lost_beyond_load_in_shards=(lost - load) / shard_s, identical=same)


def workers(ckpt: Path, tmp: Path, rows: int, shard: int, record) -> None:
    corpus = write_corpus(tmp / "workers.jsonl", rows, seed=2)
    walls = {}
    for n in (1, 2):
        walls[n] = embed_cli(ckpt, corpus, tmp / f"w{n}", "--shard-rows", str(shard), "--workers", str(n))["wall_s"]
    same = all((tmp / "w2" / p.name).read_bytes() == p.read_bytes() for p in (tmp / "w1").glob("shard-*"))
    record("workers", rows=rows, shard_rows=shard, one_worker_s=walls[1], two_workers_s=walls[2],
           speedup=walls[1] / walls[2], cores=os.cpu_count(), identical=same)


def gpu(tmp: Path, docs: int, record) -> None:
    import numpy as np
    import torch
    from bench_embed import MODELS, texts_of_lengths

    from rematch_fast import ReMatch, corpus as corpus_mod
    from rematch_fast.jsonl import Row
    from rematch_fast.items import Item
    from rematch_fast.tiny import make_tiny_checkpoint

    arch, sizes = MODELS["3b"]
    ckpt = make_tiny_checkpoint(tmp / "3b", arch=arch, seed=0, dtype=torch.bfloat16, device="cuda", **sizes)
    model = ReMatch.from_pretrained(ckpt, backend="fast", device="cuda", dtype=torch.bfloat16)
    texts = texts_of_lengths(model, np.random.default_rng(1).integers(16, 257, docs), seed=1)
    model.encode(texts[:256], side="document")  # warm
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.encode(texts, side="document")
    torch.cuda.synchronize()
    library = time.perf_counter() - t
    job = corpus_mod.Job(str(ckpt), model.checkpoint.fingerprint, "document", model.dim, "float32", 100_000,
                         {"backend": "fast"}, 64, "bench")
    rows = [Row(i + 1, i, Item(text=s), "") for i, s in enumerate(texts)]
    summary = corpus_mod.run(job, iter(rows), tmp / "gpu_store", {}, progress=False, model=model)
    record("gpu", rows=docs, library_rows_per_s=docs / library, cli_rows_per_s=summary.rows / summary.seconds,
           ratio=library / summary.seconds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="10000,100000,200000", help="corpus sizes of the scale rows")
    ap.add_argument("--resume-rows", type=int, default=10_000, help="corpus of the resume and workers rows")
    ap.add_argument("--resume-shard", type=int, default=1_000, help="shard size of the resume and workers rows")
    ap.add_argument("--gpu", action="store_true", help="also the gpu row (CUDA, Qwen2.5-VL-3B shapes)")
    ap.add_argument("--gpu-docs", type=int, default=4096)
    ap.add_argument("--out", help="folder for corpus.jsonl / corpus.md")
    args = ap.parse_args(argv)
    from rematch_fast.tiny import make_tiny_checkpoint

    results = Results(args.out, "corpus")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_tiny_checkpoint(tmp / "tiny", arch="qwen2.5-vl", seed=0)

        def record(part, **row):
            results.add(part=part, **row)

        scale(ckpt, tmp, [int(n) for n in args.rows.split(",")], record)
        resume(ckpt, tmp, args.resume_rows, args.resume_shard, record)
        workers(ckpt, tmp, args.resume_rows, args.resume_shard, record)
        if args.gpu:
            gpu(tmp, args.gpu_docs, record)
    scale_rows = [r for r in results.rows if r["part"] == "scale"]
    if len(scale_rows) > 1:
        growth = scale_rows[-1]["peak_rss_mb"] - scale_rows[0]["peak_rss_mb"]
        results.add(part="rss growth", rows=f"{scale_rows[0]['rows']}->{scale_rows[-1]['rows']}", rss_growth_mb=growth)
    print(results.markdown(["part", "rows", "rows_per_s", "peak_rss_mb", "rss_growth_mb", "lost_s", "load_s",
                            "shard_s", "lost_beyond_load_in_shards", "speedup", "identical", "ratio"]))


if __name__ == "__main__":
    main()
