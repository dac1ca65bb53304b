"""Export benchmark (C1 of docs/benchmarks.md): the ONNX export run by ONNX Runtime on the CPU
against torch fp32 eager, on texts of 32..128 tokens, with the quality figures beside the speed.

Providers, timed round-robin in one run (medians), each embedding the same texts as documents:
  torch-reference  backend="reference" (transformers, fp32 eager): the C1 baseline
  torch-fast       backend="fast" (this project's packed engine, fp32)
  onnx-fp32        backend="onnx" on the fp32 export (ONNX Runtime, CPU provider)
  onnx-int8-dynamic  the same with the int8-dynamic preset
  onnx-int8-weight the same with the int8-weight preset (8-bit weight-only MatMulNBits)
  onnx-int8-qdq    the same with the int8-qdq preset (SmoothQuant, static Q/DQ)
  torch-fast-cuda  on a machine with a GPU only: the fast backend on it in bf16, beside the
                   CPU providers (ONNX Runtime's CPU provider against the GPU engine, one run)
cosine_min and top10_overlap compare each provider's embeddings with torch-reference's
(rematch_fast.export.parity.compare: each text as a query and as a document).

    python benchmarks/bench_export.py --out results/            # mid-size model
    python benchmarks/bench_export.py --model tiny --texts 16   # quicker
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import MODELS, texts_of_lengths  # noqa: E402
from harness import Results, interleaved_median_ms  # noqa: E402

from rematch_fast import ReMatch  # noqa: E402
from rematch_fast.export.exporter import export_onnx  # noqa: E402
from rematch_fast.export.parity import compare  # noqa: E402
from rematch_fast.tiny import make_tiny_checkpoint  # noqa: E402


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mid", choices=sorted(MODELS))
    ap.add_argument("--texts", type=int, default=64, help="texts of 32..128 tokens (default: 64)")
    ap.add_argument("--iters", type=int, default=5, help="timed rounds (default: 5)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what the timer synchronises
    res = Results(args.out, "export")
    arch, sizes = MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", arch=arch, seed=0, **sizes)
        export_onnx(ckpt, Path(tmp) / "onnx")
        export_onnx(ckpt, Path(tmp) / "onnx-int8", quantize="int8-dynamic")
        export_onnx(ckpt, Path(tmp) / "onnx-weight", quantize="int8-weight")
        export_onnx(ckpt, Path(tmp) / "onnx-qdq", quantize="int8-qdq")
        models = {"torch-reference": ReMatch.from_pretrained(ckpt),
                  "torch-fast": ReMatch.from_pretrained(ckpt, backend="fast"),
                  "onnx-fp32": ReMatch.from_pretrained(Path(tmp) / "onnx", backend="onnx"),
                  "onnx-int8-dynamic": ReMatch.from_pretrained(Path(tmp) / "onnx-int8", backend="onnx"),
                  "onnx-int8-weight": ReMatch.from_pretrained(Path(tmp) / "onnx-weight", backend="onnx"),
                  "onnx-int8-qdq": ReMatch.from_pretrained(Path(tmp) / "onnx-qdq", backend="onnx")}
        if dev.type == "cuda":
            models["torch-fast-cuda"] = ReMatch.from_pretrained(ckpt, backend="fast", device=dev, dtype=torch.bfloat16)
        lengths = np.random.default_rng(0).integers(32, 129, args.texts)
        texts = texts_of_lengths(models["torch-fast"], lengths, seed=1)
        tokens = int(lengths.sum())
        ms = interleaved_median_ms({name: (lambda m=m: m.encode(texts, side="document")) for name, m in models.items()},
                                   dev, iters=args.iters, warmup=1)
        for name, m in models.items():
            precision = "int8" if "int8" in name else "fp16" if name.endswith("cuda") else "fp32"
            quality = compare(models["torch-reference"], m, texts, precision)
            res.add(model=args.model, provider=name, texts=len(texts), ms=ms[name], tokens_per_s=tokens / ms[name] * 1e3,
                    x_torch=ms["torch-reference"] / ms[name], cosine_min=quality.cosine_min,
                    top10_overlap=quality.top10_overlap, threads=torch.get_num_threads())
    table = res.markdown(["model", "provider", "texts", "ms", "tokens_per_s", "x_torch", "cosine_min", "top10_overlap"])
    print(table)
    return table


if __name__ == "__main__":
    main()
