"""Embedding benchmark (W1, W1e, W2, W5 of docs/benchmarks.md) for these providers:

  hf         plain transformers driven the obvious way (the baseline of docs/benchmarks.md): padded
             batches of raw token ids (W2: <vision_start> image pads <vision_end> + the text,
             with the already-cut pixel patches) through model.model; no template, no
             learnable tokens, no tokenizing or image preprocessing inside the timing
  reference  rematch_fast backend="reference" (transformers modules, padded batches, full ReMatch input)
  fast       rematch_fast backend="fast" as from_pretrained gives it (own model, packed batches,
             token-budget scheduler; on CUDA, CUDA-graph latency buckets for small text batches)
  fast-noshare  (W1e, W5) the same with share_prefix=False: the embed template's part before the item
             recomputed in every sequence instead of computed once and shared (on W5 with latency
             buckets, as on CUDA, `fast` runs the single query whole too: the same path)
  fast-graphs (W1, W1e, not with --compiled) the same with packed_graphs=True: packed batches in static shapes, replayed
             as CUDA graphs on a GPU (run eagerly on the CPU); each shape is captured at its second
             batch, and two untimed passes over all the texts (after one over the warm-up slice)
             capture them all (a corpus meets the same shapes again and again)
  fast-swiglu (W1, W1e, GPU, not with --compiled) the same with kernels="auto+swiglu-gemm": the gate/up
             projection and SwiGLU's gate as one autotuned Triton GEMM (the gate in its epilogue) instead of
             cuBLAS and the gate kernel; the autotuner's choices are printed (tuned in the warm-up, untimed)
  MLP        (GPU, with fast-swiglu) the MLP's gate/up GEMM alone, then the gate kernel, and the swiglu
             GEMM, at 8192 tokens and 64 (ms per call): whether the epilogue beats cuBLAS plus the gate
  fast-buckets  (W5, CPU) the same with latency_buckets=(64, 128, 256): static shapes, padded eagerly
  fast-eager    (W5, GPU) the same with latency_buckets=(): the eager path the buckets replace
  fast-compiled (W1, W1e, with --compiled) every decoder layer through torch.compile (on a GPU
             mode="max-autotune-no-cudagraphs"), attention eager, the hand-written kernels kept
             (opaque custom ops to the compiler); compile time is spent in the warm-up, untimed
  fast-inductor (W1, W1e, with --compiled) the same with kernels="torch": the layers' norms, rotary
             and SwiGLU gate as plain torch, so that inductor fuses them itself (into its own
             kernels or its GEMM templates' epilogues): the measured alternative to the hand-fused path

W1: ragged texts (16..256 tokens, arrival order), useful tokens/s. W1e: all 128 tokens. Both also
report processed tokens/s (template, item and learnable tokens: what the model runs) and, on CUDA,
`busy`: the fraction of the wall time some kernel runs on the device (host stalls show as less than 1).
W2: square images + a short text, images/s. W5: one 48-token query, latency ms.
"Useful tokens" are the documents' own tokens; rematch_fast providers also pay for the
template and the K learnable tokens, and time end to end (tokenizing, image preprocessing).
Random weights, real architectures. Providers are timed round-robin, every call under inference
mode (harness.py); medians are reported.

x_hf, x_reference: throughput / that provider's (W5: its ms / ms), same run. of_ceiling: the fraction of this card's
ceiling measured at the start: its dense GEMM rate over the linear-layer FLOPs of the useful
work (2 x parameters per token; images add the vision tower's 2 x parameters per patch), and
for W5 the time to read the decoder's weights once at the card's copy bandwidth over the latency.

    python benchmarks/bench_embed.py --out results/                  # CPU: tiny and mid-size models
    python benchmarks/bench_embed.py --gpu --model 3b --out results/ # Qwen2.5-VL-3B shapes, bf16
"""
from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch._dynamo
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import profile_table, Results, busy_fraction, ceilings, interleaved_median_ms  # noqa: E402

from rematch_fast import ReMatch  # noqa: E402
from rematch_fast.backends.fast import DEFAULT_LATENCY_BUCKETS  # noqa: E402
from rematch_fast.tiny import make_tiny_checkpoint  # noqa: E402

MODELS = {  # name: (arch, size overrides of make_tiny_checkpoint)
    "tiny": ("qwen2.5-vl", {}),
    "mid": ("qwen2.5-vl", dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                                num_key_value_heads=2, vision_depth=4, vision_hidden_size=256, vision_num_heads=4,
                                vision_intermediate_size=512, projector_hidden_size=512, max_pixels=448 * 448)),
    "3b": ("qwen2.5-vl", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                               num_key_value_heads=2, vision_depth=32, vision_hidden_size=1280, vision_num_heads=16,
                               vision_intermediate_size=3420, vision_window_size=112, vision_fullatt_every=8,
                               projector_hidden_size=2048, max_pixels=28 * 28 * 1280, max_text_tokens=1024)),
    "2b": ("qwen2-vl", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                             num_key_value_heads=2, vision_depth=32, vision_hidden_size=1280, vision_num_heads=16,
                             vision_intermediate_size=5120, projector_hidden_size=1536, max_pixels=28 * 28 * 1280,
                             max_text_tokens=1024)),
}
WORDS = ("river photo seven blue market bread engine quiet signal garden winter paper stone music "
         "orange window travel science history number").split()
# GPU: three timed rounds of the 4096 texts (medians); the reference (~20 s a round on W1) joins W1 / W1e
# only with --with-reference, so that gpu_suite.sh's embedding part stays within its limit
GPU_SCALE = dict(docs=4096, images=64, side=448, hf_text_batch=256, hf_image_batch=16, iters=3, warm_docs=256)
# CPU: a shared machine drifts; the tiny model's rounds are short, so it gets many
CPU_SCALE = dict(docs=128, images=8, side=224, hf_text_batch=64, hf_image_batch=8, iters=3, warm_docs=16)
CPU_TINY_ITERS = 15
COLUMNS = ["model", "workload", "provider", "items", "value", "unit", "x_hf", "x_reference", "of_ceiling",
           "processed_tokens_per_s", "busy"]


def texts_of_lengths(model: ReMatch, lengths, seed: int) -> list[str]:
    """Texts whose token counts are exactly `lengths` (random words, cut at the token level)."""
    rng = np.random.default_rng(seed)
    tok = model.preprocessor.tok.text
    out = []
    for n in lengths:
        ids = tok.encode(" ".join(rng.choice(WORDS, size=n)), add_special_tokens=False).ids[:n]
        out.append(tok.decode(ids))
    return out


def images(n: int, side: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def hf_text_runner(model: ReMatch, texts, batch: int, dev):
    """Plain transformers on the reference backend's own (already loaded) HF model."""
    hf, tok = model.backend.model, model.preprocessor.tok.text
    batches = []
    for s in range(0, len(texts), batch):
        ids = [tok.encode(t, add_special_tokens=False).ids for t in texts[s: s + batch]]
        L = max(map(len, ids))
        batches.append(torch.tensor([x + [-1] * (L - len(x)) for x in ids], device=dev))

    @torch.inference_mode()  # also when called outside the harness (warm-up): no autograd activations
    def run():
        for ids in batches:
            hf.model(input_ids=ids.clamp_min(0), attention_mask=(ids != -1).long()).last_hidden_state[:, -1]
    return run


def hf_image_runner(model: ReMatch, items, batch: int, dev):
    """Plain transformers on images: <vision_start> image pads <vision_end> + the item's text."""
    hf, cfg = model.backend.model, model.backend.model.config
    takes_types = "mm_token_type_ids" in inspect.signature(hf.model.forward).parameters
    prepared = [model.prepare(x) for x in items]
    batches = []
    for s in range(0, len(prepared), batch):
        part = prepared[s: s + batch]
        rows = [[cfg.vision_start_token_id] + [cfg.image_token_id] * (p.pixel_values.shape[0] // model.backend.merge**2)
                + [cfg.vision_end_token_id] + p.text_ids for p in part]
        L = max(map(len, rows))
        ids = torch.tensor([r + [0] * (L - len(r)) for r in rows], device=dev)
        mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], device=dev)
        extra = {"mm_token_type_ids": (ids == cfg.image_token_id).long()} if takes_types else {}
        pixels = torch.cat([p.pixel_values for p in part]).to(dev, model.backend.dtype)
        grids = torch.tensor([p.grid_thw for p in part], device=dev)
        batches.append(dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids, **extra))

    @torch.inference_mode()
    def run():
        for b in batches:
            hf.model(**b).last_hidden_state[:, -1]
    return run


def parameter_counts(fast: ReMatch) -> tuple[int, int]:
    """(decoder parameters without the embedding table, vision tower parameters)."""
    m = fast.backend.model
    lm = sum(p.numel() for p in m.decoder.parameters()) - m.decoder.embed_tokens.weight.numel()
    return lm, sum(p.numel() for p in m.visual.parameters())


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--model", nargs="+", help=f"from {sorted(MODELS)} (default: tiny mid on CPU, 3b on GPU)")
    ap.add_argument("--out")
    ap.add_argument("--compiled", action="store_true",
                    help="also fast-compiled and fast-inductor on W1 / W1e (torch.compile of the decoder layers; "
                         "minutes of autotuning on a GPU)")
    ap.add_argument("--name", default="embed", help="the results' file name in --out (default: embed)")
    ap.add_argument("--docs", type=int, help="texts in W1 / W1e (default: 4096 on a GPU, 128 on the CPU)")
    ap.add_argument("--images", type=int, help="images in W2 (default: 64 of 448x448 on a GPU, 8 of 224x224 on the CPU)")
    ap.add_argument("--with-reference", action="store_true",
                    help="time the reference backend on W1 / W1e on a GPU too (always on the CPU)")
    ap.add_argument("--iters", type=int, help="timed rounds of W1 / W1e (default: 3 on a GPU; 15 for tiny, 3 for "
                                              "larger models on the CPU); "
                                              "W2 takes at least 3, W5 30")
    ap.add_argument("--workloads", nargs="+", choices=["W1", "W1e", "W2", "W5"], default=["W1", "W1e", "W2", "W5"],
                    help="which workloads to run (default: all)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile `fast`, `fast-graphs`, `fast-swiglu` (with --compiled: `fast` and the "
                         "compiled variants) on 512 W1e texts (<name>_profile_<model>[_variant].txt; the timelines "
                         "of fast and fast-graphs: <name>_trace_<model>[_graphs].json.gz)")
    args = ap.parse_args(argv)
    # a compiled layer past the recompile limit would run eager and be timed as "compiled": fail instead
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=args.compiled):
        return run(args)


def run(args) -> str:
    dev = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    scale = dict(GPU_SCALE if args.gpu else CPU_SCALE)
    scale.update({k: v for k, v in (("docs", args.docs), ("images", args.images)) if v})
    ceil = ceilings(dev)
    print(f"# {ceil['device']}: copy {ceil['copy_GBps']:.0f} GB/s, {ceil['gemm_dtype']} GEMM {ceil['gemm_TFLOPs']:.3g} TFLOP/s")
    flops_per_s = ceil["gemm_TFLOPs"] * 1e12
    res = Results(args.out, args.name)
    for name in args.model or (["3b"] if args.gpu else ["tiny", "mid"]):
        arch, sizes = MODELS[name]
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = make_tiny_checkpoint(Path(tmp) / name, arch=arch, seed=0, dtype=dtype, device=dev, **sizes)
            ref = ReMatch.from_pretrained(ckpt, backend="reference", device=dev, dtype=dtype)
            fast = ReMatch.from_pretrained(ckpt, backend="fast", device=dev, dtype=dtype)
            # the default's counterpart for W5: buckets where the default has none (CPU), none where it has them
            other = ("fast-eager", ()) if dev.type == "cuda" else ("fast-buckets", DEFAULT_LATENCY_BUCKETS)
            buckets = ReMatch.from_pretrained(ckpt, backend="fast", device=dev, dtype=dtype, latency_buckets=other[1])
            # the same engine with the embed template's prefix recomputed in every sequence (the gain of sharing it)
            noshare = ReMatch.from_pretrained(ckpt, backend="fast", device=dev, dtype=dtype, share_prefix=False)
            # packed graphs (left out of the --compiled run: their captures take its time limit)
            graphs = {"fast-graphs": ReMatch.from_pretrained(ckpt, backend="fast", device=dev, dtype=dtype,
                                                             packed_graphs=True)} if not args.compiled else {}
            # the gate in the gate/up GEMM's epilogue (on the CPU the same torch references as fast: not run;
            # left out of the --compiled run, which compares torch.compile within its own time limit)
            swiglu = {"fast-swiglu": ReMatch.from_pretrained(ckpt, backend="fast", device=dev, dtype=dtype,
                                                             kernels="auto+swiglu-gemm")
                      } if args.gpu and not args.compiled else {}
            mode = "max-autotune-no-cudagraphs" if dev.type == "cuda" else "default"
            # no latency buckets: a throughput comparison, and no CUDA-graph capture of compiled code
            compiled = {p: ReMatch.from_pretrained(ckpt, backend="fast", device=dev, dtype=dtype, compile=mode,
                                                   kernels=kernels, latency_buckets=())
                        for p, kernels in (("fast-compiled", "auto"), ("fast-inductor", "torch")) if args.compiled}
        lm_params, vision_params = parameter_counts(fast)
        iters = args.iters or (CPU_TINY_ITERS if name == "tiny" and not args.gpu else scale["iters"])
        tok = fast.preprocessor.tok.text

        def record(workload, items, values: dict, unit, ceiling_value, ms: dict, extra: dict | None = None):
            """One row per provider; ratios to hf and to the reference are "times better". `extra`:
            more columns per provider."""
            better = (lambda a, b: b / a) if unit == "ms" else (lambda a, b: a / b)
            for provider, value in values.items():
                res.add(model=name, workload=workload, provider=provider, items=items, value=value, unit=unit,
                        x_hf=better(value, values["hf"]),
                        x_reference=better(value, values["reference"]) if "reference" in values else None,
                        of_ceiling=better(value, ceiling_value), ms=ms[provider], device=ceil["device"],
                        **(extra or {}).get(provider, {}))

        rng = np.random.default_rng(0)
        work = {
            "W1": texts_of_lengths(fast, rng.integers(16, 257, scale["docs"]), seed=1),
            "W1e": texts_of_lengths(fast, [128] * scale["docs"], seed=2),
        }
        for wl, texts in work.items():
            if wl not in args.workloads:
                continue
            useful = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)
            # what the model runs: template, item and learnable tokens (before the template prefix is shared)
            processed = sum(fast.preprocessor.embed_length(fast.prepare(t), "document") for t in texts)
            warm = texts[: scale["warm_docs"]]
            warmers = [hf_text_runner(ref, warm, scale["hf_text_batch"], dev), lambda: ref.encode(warm, side="document"),
                       lambda: fast.encode(warm, side="document")]
            # captures, torch.compile's or the swiglu GEMM's autotuning: here, untimed
            for m in (*graphs.values(), *compiled.values(), *swiglu.values()):
                warmers += [lambda m=m: m.encode(warm, side="document"), lambda m=m: m.encode(texts, side="document")]
            for m in graphs.values():  # every shape's second batch: captured
                warmers.append(lambda m=m: m.encode(texts, side="document"))
            for fn in warmers:
                fn()  # kernels compiled, allocator settled, on a slice (the whole set takes long on hf)
            providers = {"hf": hf_text_runner(ref, texts, scale["hf_text_batch"], dev),
                         "reference": lambda: ref.encode(texts, side="document"),
                         "fast": lambda: fast.encode(texts, side="document")}
            if wl == "W1e":
                providers["fast-noshare"] = lambda: noshare.encode(texts, side="document")
            for p, m in {**graphs, **swiglu, **compiled}.items():
                providers[p] = lambda m=m: m.encode(texts, side="document")
            if args.gpu and not args.with_reference:
                del providers["reference"]
            ms = interleaved_median_ms(providers, dev, iters=iters, warmup=0)
            extra = {p: {"processed_tokens_per_s": processed / t * 1e3} for p, t in ms.items() if p != "hf"}
            # the share of the wall time the GPU is busy
            for p in ("fast", "fast-noshare", "fast-graphs", *swiglu, *compiled):
                if p in providers and (busy := busy_fraction(providers[p], dev)) is not None:
                    extra[p]["busy"] = busy
            record(wl, len(texts), {p: useful / t * 1e3 for p, t in ms.items()}, "tokens/s",
                   flops_per_s / (2 * lm_params), ms, extra)
            res.markdown(COLUMNS)  # the table so far, written: a part cut short in its profiles keeps it
            if args.profile and wl == "W1e":  # where the time goes
                # with --compiled: fast beside the compiled variants (part embed profiles the others)
                profiled = {"fast": fast, **compiled} if compiled else {"fast": fast, **graphs, **swiglu}
                for p, m in profiled.items():
                    variant = "" if p == "fast" else "_" + p.removeprefix("fast-")
                    stem = f"{args.name}_profile_{name}{variant}"
                    timeline = args.out and p in ("fast", "fast-graphs")  # where the device waits, and for what
                    trace = Path(args.out) / f"{args.name}_trace_{name}{variant}.json.gz" if timeline else None
                    text = profile_table(lambda m=m: m.encode(texts[:512], side="document"), dev, trace=trace)
                    print(f"# profile of {p}\n{text}")
                    if args.out:
                        (Path(args.out) / f"{stem}.txt").write_text(text)

        if "W2" in args.workloads:
            w2(fast, ref, scale, iters, dev, flops_per_s, lm_params, vision_params, record)
        if "W5" in args.workloads:
            w5(fast, ref, noshare, (other[0], buckets), dtype, ceil, lm_params, dev, record)
        if swiglu:
            from rematch_fast.kernels.swiglu_gemm import tuned_configs

            mlp_kernels(name, fast, dtype, dev, flops_per_s, res)
            for key, config in tuned_configs().items():  # (rows rounded up, I, D, dtype, device): the tiles chosen
                print(f"# swiglu GEMM tiles {key}: {config}")
        del ref, fast, buckets, noshare, graphs, compiled, swiglu
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    table = res.markdown(COLUMNS)
    print(table)
    return table


def w2(fast, ref, scale, iters, dev, flops_per_s, lm_params, vision_params, record):
    """W2: square images with a short text, images/s."""
    items = [{"text": "a photo of", "image": im} for im in images(scale["images"], scale["side"], seed=3)]
    first = fast.prepare(items[0])
    patches, text_tokens = first.pixel_values.shape[0], len(first.text_ids) + 2
    image_flops = 2 * (vision_params * patches + lm_params * (patches // 4 + text_tokens))
    ms = interleaved_median_ms({
        "hf": hf_image_runner(ref, items, scale["hf_image_batch"], dev),
        "reference": lambda: ref.encode(items, side="document"),
        "fast": lambda: fast.encode(items, side="document"),
    }, dev, iters=max(3, iters), warmup=1)
    record("W2", len(items), {p: len(items) / t * 1e3 for p, t in ms.items()}, "images/s", flops_per_s / image_flops, ms)


def w5(fast, ref, noshare, other, dtype, ceil, lm_params, dev, record):
    """W5: one 48-token query, latency ms against reading the decoder's weights once."""
    query = texts_of_lengths(fast, [48], seed=4)
    weights_ms = lm_params * torch.finfo(dtype).bits / 8 / (ceil["copy_GBps"] * 1e9) * 1e3
    ms = interleaved_median_ms({
        "hf": hf_text_runner(ref, query, 1, dev),
        "reference": lambda: ref.embed(query),
        "fast": lambda: fast.embed(query),
        "fast-noshare": lambda: noshare.embed(query),
        other[0]: lambda: other[1].embed(query),
    }, dev, iters=30, warmup=3)
    record("W5", 1, ms, "ms", weights_ms, ms)


def mlp_kernels(name, fast, dtype, dev, flops_per_s, res, repeat: int = 20):
    """The decoder MLP's first half alone, at a W1e batch's token count and a query's: the gate/up GEMM
    (cuBLAS, the floor to beat), that GEMM then the gate kernel (what `fast` runs), and the swiglu GEMM
    (what `fast-swiglu` runs). ms per call over `repeat` calls between synchronizations;
    of_ceiling: the GEMM's FLOPs at the card's measured GEMM rate over that time."""
    from rematch_fast.ops import CUSTOM_OPS, SWIGLU_GEMM_OPS

    mlp = fast.backend.model.decoder.layers[0].mlp
    w = mlp.gate_up_proj.weight
    for tokens in (8192, 64):
        x = torch.randn(tokens, w.shape[1], device=dev, dtype=dtype)
        kernels = {"gate/up GEMM": lambda: torch.nn.functional.linear(x, w),
                   "GEMM then gate": lambda: CUSTOM_OPS.silu_mul(torch.nn.functional.linear(x, w)),
                   "swiglu GEMM": lambda: SWIGLU_GEMM_OPS.swiglu_gemm(x, w, None)}
        ms = interleaved_median_ms({k: lambda f=f: [f() for _ in range(repeat)] for k, f in kernels.items()},
                                   dev, iters=15, warmup=2)
        flop_ms = 2 * tokens * w.shape[0] * w.shape[1] / flops_per_s * 1e3
        for kernel, t in ms.items():
            res.add(model=name, workload="MLP", provider=kernel, items=tokens, value=t / repeat, unit="ms",
                    of_ceiling=flop_ms / (t / repeat), device=str(dev))


if __name__ == "__main__":
    main()
