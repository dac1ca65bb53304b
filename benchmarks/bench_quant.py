"""Low-precision benchmark (W6 of docs/benchmarks.md): each weight format of
rematch_fast.model.quant against the model's own dtype, in one run.

Presets: every one of rematch_fast.model.quant.PRESETS, fp8 only on GPUs of compute capability 8.9+,
bnb-int8 and bnb-nf4 where bitsandbytes is installed; W6 also times torchao's int8 weight-only (and
float8 on 8.9+) where torchao is installed, the well-kept alternative to our own layers.

  W6      one linear layer, 2048 -> 11008 and 11008 -> 2048 (Qwen2.5-VL-3B's MLP), at
          M = 1, 16, 256, 4096 rows: ms per call and x_base (base ms / preset ms)
  model   the fast backend with each preset: W1e (texts of 128 tokens) throughput, W5 (one 48-token
          query) latency, the linear layers' weight bytes, and quality against the unquantized model
          (rematch_fast.export.parity.compare: cosine min, top-10 overlap, |delta p(yes)|); on a GPU,
          W5 replays the latency buckets' CUDA graph except for the bnb-* presets, which run eagerly
          (their kernels cannot be captured): their x_base_W5 compares eager with replayed

The base is the model's dtype: bf16 on a GPU, fp32 on the CPU unless --dtype says otherwise (on
the CPU torch's int8 kernel is fast with bf16 activations only); providers are timed round-robin,
medians reported (harness.py).

    python benchmarks/bench_quant.py --out results/                   # CPU: mid-size model, W6 to M = 256
    python benchmarks/bench_quant.py --gpu --model 3b --out results/  # Qwen2.5-VL-3B shapes, bf16
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import MODELS, texts_of_lengths  # noqa: E402
from harness import Results, interleaved_median_ms  # noqa: E402

from rematch_fast import ReMatch  # noqa: E402
from rematch_fast.export.parity import compare  # noqa: E402
from rematch_fast.model.quant import LAYERS, PRESETS, QuantizedLinear  # noqa: E402
from rematch_fast.tiny import make_tiny_checkpoint  # noqa: E402

W6_SHAPES = ((2048, 11008), (11008, 2048))  # (in, out)


def linear_bytes(model: ReMatch) -> int:
    """Bytes of the linear layers' weights (and scales) in the fast model."""
    total = 0
    for m in model.backend.model.modules():
        if isinstance(m, QuantizedLinear):
            total += sum(b.nbytes for b in m.buffers())
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.nbytes
    return total


def presets(dev) -> list[str]:
    """The presets timed here: fp8 only where its tensor-core path runs (compute capability 8.9+;
    elsewhere it is the slow reference, a check rather than a speed); bnb-* where bitsandbytes
    is installed. Says which it leaves out."""
    fp8 = dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9)
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    left = {"fp8": None if fp8 else "its tensor cores need compute capability 8.9+",
            "bnb-int8": None if bnb else "bitsandbytes is not installed"}
    left["bnb-nf4"] = left["bnb-int8"]
    for p, why in left.items():
        if why:
            print(f"bench_quant: {p} left out: {why}")
    return [p for p in PRESETS if not left.get(p)]


def torchao_layers(base: torch.nn.Linear, dev) -> dict:
    """torchao's versions of the same layer, where torchao is installed: int8 weight-only, and
    float8 (dynamic per-row activations) on compute capability 8.9+."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        print("bench_quant: torchao rows left out: torchao is not installed")
        return {}
    configs = {"torchao int8-weight": Int8WeightOnlyConfig}
    if "fp8" in presets(dev):
        configs["torchao fp8"] = Float8DynamicActivationFloat8WeightConfig
    out = {}
    for name, config in configs.items():
        layer = copy.deepcopy(base)
        quantize_(layer, config())
        out[name] = layer
    return out


def w6(res: Results, dev, dtype, rows, iters: int) -> None:
    g = torch.Generator().manual_seed(0)
    for k, n in W6_SHAPES:
        base = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.randn(n, k, generator=g) * k**-0.5)
        base = base.to(dev, dtype)
        layers = {"base": base, **{p: LAYERS[p].from_linear(base) for p in presets(dev) if p in LAYERS},
                  **torchao_layers(base, dev)}
        for m in rows:
            x = torch.randn(m, k, generator=g).to(dev, dtype)
            ms = interleaved_median_ms({p: (lambda layer=layer: layer(x)) for p, layer in layers.items()}, dev,
                                       iters=iters, warmup=2)
            for p in layers:
                res.add(shape=f"{k}x{n}", M=m, preset=p, ms=ms[p], x_base=ms["base"] / ms[p])


def whole_model(res: Results, ckpt, dev, dtype, texts: int, iters: int) -> None:
    models = {p: ReMatch.from_pretrained(ckpt, backend="fast", device=dev, dtype=dtype, quantize=p) for p in presets(dev)}
    base = models["bf16"]
    docs = texts_of_lengths(base, [128] * texts, seed=1)
    query = texts_of_lengths(base, [48], seed=2)
    thr = interleaved_median_ms({p: (lambda m=m: m.encode(docs, side="document")) for p, m in models.items()}, dev,
                                iters=iters, warmup=1)
    lat = interleaved_median_ms({p: (lambda m=m: m.encode(query, side="query")) for p, m in models.items()}, dev,
                                iters=iters * 4, warmup=2)
    for p, m in models.items():
        q = compare(base, m, precision="int8")
        res.add(preset=p, W1e_tokens_per_s=128 * texts / thr[p] * 1e3, W5_ms=lat[p],
                x_base_W1e=thr["bf16"] / thr[p], x_base_W5=lat["bf16"] / lat[p],
                linear_MB=linear_bytes(m) / 2**20, of_base_bytes=linear_bytes(m) / linear_bytes(base),
                cosine_min=q.cosine_min, top10_overlap=q.top10_overlap, p_yes_max_abs=q.p_yes_max_abs)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="run on CUDA in bf16 (default: the CPU in fp32)")
    ap.add_argument("--model", default=None, choices=sorted(MODELS), help="default: 3b on a GPU, mid on the CPU")
    ap.add_argument("--rows", default=None, help="W6 row counts, comma-separated (default 1,16,256,4096; CPU: to 256)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="the base dtype (default: bfloat16 on a GPU, "
                                                                      "float32 on the CPU)")
    ap.add_argument("--texts", type=int, default=64, help="W1e texts of 128 tokens (default: 64)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if args.gpu else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.gpu else "float32"))
    rows = [int(r) for r in (args.rows or ("1,16,256,4096" if args.gpu else "1,16,256")).split(",")]
    layer, model = Results(args.out, "quant_w6"), Results(args.out, "quant_model")
    w6(layer, dev, dtype, rows, args.iters * 4)
    arch, sizes = MODELS[args.model or ("3b" if args.gpu else "mid")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", arch=arch, seed=0, **sizes)
        whole_model(model, ckpt, dev, dtype, args.texts, args.iters)
    table = layer.markdown(["shape", "M", "preset", "ms", "x_base"]) + "\n\n" + model.markdown(
        ["preset", "W1e_tokens_per_s", "x_base_W1e", "W5_ms", "x_base_W5", "linear_MB", "of_base_bytes", "cosine_min",
         "top10_overlap", "p_yes_max_abs"])
    print(table)
    return table


if __name__ == "__main__":
    main()
