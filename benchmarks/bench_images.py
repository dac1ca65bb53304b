"""Image preparation benchmark (C2, and the W2 / W2j stage breakdown, of docs/benchmarks.md).

C2   ms per image to turn a decoded RGB image into the model's patches, for
       transformers   its Qwen2VLImageProcessorPil, from the decoded image (its own resize)
       python         rematch_fast's pure-Python path (Pillow's resize, then that processor)
       native         rematch_fast._C (float32 patches; and uint8, the GPU path's form)
     on a 448x448 image, a 1024x768 JPEG and a 4000x3000 JPEG (JPEG decoding is its own column,
     the same for every provider): per image on one thread (the processor's own call), and on N
     threads over 8 images (a thread pool; native: its batch call into one buffer), with the
     speed-up over transformers and the scaling (the N-thread call on 1 thread / (on N threads x
     N)). Outputs are checked equal before anything is timed.

W2   64 decoded 448x448 images (CPU: 16), W2j 256 JPEG files of 1024x768 photos on disk (CPU: 32),
     embedded by the fast backend. Each stage alone on one thread: decode, resize, patches
     (normalize and cut), host-to-device (GPU), vision tower, and the rest of the model (its whole
     time on prepared items less the vision tower); then the whole run's wall time, where the
     pipeline decodes and patches on a thread pool while the model runs. Patches/s of W2j against
     W2 shows whether decoding hides behind the model.

    python benchmarks/bench_images.py --out results/            # CPU, tiny model
    python benchmarks/bench_images.py --gpu --out results/      # Qwen2.5-VL-3B shapes, bf16
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import MODELS  # noqa: E402
from harness import Results, interleaved_median_ms, sync  # noqa: E402

from rematch_fast import ReMatch, native  # noqa: E402
from rematch_fast.checkpoint import ImageSettings  # noqa: E402
from rematch_fast.images import ImageProcessor  # noqa: E402
from rematch_fast.tiny import make_tiny_checkpoint  # noqa: E402


# C2 runs at Qwen2-VL's published image constants, bounded at 1,280 merged tokens (1280 x 28 x 28 pixels):
# a 1024x768 photo gives 3,996 patches and a 4000x3000 one 4,920
C2_SETTINGS = ImageSettings(min_pixels=3136, max_pixels=1280 * 28 * 28, patch_size=14, temporal_patch_size=2,
                            merge_size=2, image_mean=(0.48145466, 0.4578275, 0.40821073),
                            image_std=(0.26862954, 0.26130258, 0.27577711))


def photo(w: int, h: int, seed: int) -> Image.Image:
    """Smooth gradients and blobs plus noise: compresses like a photo, not like pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = []
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 6, size=3)
        channels.append(127 + 100 * np.sin(x / w * fx * np.pi + phase) * np.cos(y / h * fy * np.pi))
    a = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def c2(res: Results, proc: ImageProcessor, threads: int, iters: int, small: bool = False) -> None:
    inputs = {"448x448": (photo(448, 448, 1), None), "1024x768 JPEG": (None, jpeg(photo(1024, 768, 2)))}
    if not small:
        inputs["4000x3000 JPEG"] = (None, jpeg(photo(4000, 3000, 3)))
    uint8 = ImageProcessor(proc.settings, pixels="uint8")
    for name, (decoded, data) in inputs.items():
        decode_ms = None
        if data is not None:  # from a file, as load_image reads them (draft mode for the large one)
            decoded, decode_ms = _decode(proc, data, iters)
        providers = {"transformers": lambda im=decoded: proc.hf(images=[proc._bound(im)], return_tensors="pt"),
                     "python": lambda im=decoded: proc._python(proc._bound(im)),
                     "native": lambda im=decoded: proc(im),
                     "native uint8": lambda im=decoded: uint8(im)}
        assert torch.equal(proc(decoded)[0], proc._python(proc._bound(decoded))[0])  # the same bytes
        one = interleaved_median_ms(providers, torch.device("cpu"), iters, 1)
        for p in providers:  # scaling: the same call (pool or batch) on one thread and on N
            single, many = (_threaded_ms(proc, p, decoded, n, iters) for n in (1, threads))
            res.add(input=name, provider=p, decode_ms=decode_ms, ms_1_thread=one[p],
                    x_transformers=one["transformers"] / one[p], threads=threads, ms_per_image_n_threads=many,
                    scaling=single / (many * threads))


def _decode(proc: ImageProcessor, data: bytes, iters: int) -> tuple[Image.Image, float]:
    """The JPEG decoded from a file by the processor's loader, and the median ms it takes."""
    with tempfile.NamedTemporaryFile(suffix=".jpg") as f:
        f.write(data)
        f.flush()
        ms = interleaved_median_ms({"decode": lambda: proc.load(f.name)}, torch.device("cpu"), iters, 1)["decode"]
        return proc.load(f.name), ms


def _threaded_ms(proc: ImageProcessor, provider: str, im: Image.Image, threads: int, iters: int) -> float:
    """ms per image over 8 copies of `im` on `threads` threads (native: its batch call, into one buffer)."""
    n = 8
    if provider.startswith("native"):
        s = proc.settings
        a = np.asarray(proc._bound(im))
        h, w = native._C.smart_resize(a.shape[0], a.shape[1], s.patch_size * s.merge_size, s.min_pixels, s.max_pixels)
        per = (h // s.patch_size) * (w // s.patch_size)
        cols = 3 * s.patch_size**2 * (1 if provider == "native uint8" else s.temporal_patch_size)
        out = np.empty((per * n, cols), dtype=np.uint8 if provider == "native uint8" else np.float32)

        def run():
            native._C.prepare_batch([a] * n, [(h, w)] * n, s.patch_size, s.temporal_patch_size, s.merge_size,
                                    list(s.image_mean), list(s.image_std), native.PILLOW_VERSION, out, threads)
    else:
        one = {"transformers": lambda: proc.hf(images=[proc._bound(im)], return_tensors="pt"),
               "python": lambda: proc._python(proc._bound(im))}[provider]
        pool = ThreadPoolExecutor(threads)

        def run():
            list(pool.map(lambda _: one(), range(n)))
    return interleaved_median_ms({"run": run}, torch.device("cpu"), max(2, iters // 2), 1)["run"] / n


def breakdown(res: Results, model: ReMatch, dev, workload: str, items: list, images: list, iters: int) -> None:
    """One workload stage by stage, each stage alone on one thread, then whole: the pipeline's wall
    time, with its thread pool decoding and patching while the model runs."""
    s, proc = model.checkpoint.image_settings, model.preprocessor.images
    cpu = torch.device("cpu")
    files = [x["image"] for x in items]
    stages = {}
    decoded = images
    if isinstance(files[0], (str, Path)):  # W2j: from disk
        stages["decode"] = interleaved_median_ms({"d": lambda: [proc.load(f) for f in files]}, cpu, iters, 1)["d"]
        decoded = [proc.load(f) for f in files]
    arrays = [np.asarray(proc._bound(im)) for im in decoded]
    sizes = [tuple(native._C.smart_resize(a.shape[0], a.shape[1], s.patch_size * s.merge_size, s.min_pixels,
                                           s.max_pixels)) for a in arrays]
    resized = [native._C.resize_bicubic(a, h, w, native.PILLOW_VERSION) for a, (h, w) in zip(arrays, sizes)]
    stages["resize"] = interleaved_median_ms(
        {"r": lambda: [native._C.resize_bicubic(a, h, w, native.PILLOW_VERSION) for a, (h, w) in zip(arrays, sizes)]},
        cpu, iters, 1)["r"]
    as_uint8 = proc.pixels == "uint8"
    args = (s.patch_size, s.temporal_patch_size, s.merge_size, list(s.image_mean), list(s.image_std),
            native.PILLOW_VERSION)
    stages["patches"] = interleaved_median_ms(  # on resized images: the resize is a copy
        {"p": lambda: [native._C.prepare(r, r.shape[0], r.shape[1], *args, as_uint8=as_uint8) for r in resized]},
        cpu, iters, 1)["p"]
    pixels = torch.from_numpy(np.concatenate([native._C.prepare(r, r.shape[0], r.shape[1], *args, as_uint8=as_uint8)
                                              for r in resized]))
    grids = torch.tensor([(1, h // s.patch_size, w // s.patch_size) for h, w in sizes])
    if dev.type == "cuda":
        host = pixels.pin_memory()
        stages["host-to-device"] = interleaved_median_ms({"h": lambda: host.to(dev, non_blocking=True)}, dev, iters,
                                                         1)["h"]
    on_dev = pixels.to(dev)
    prepared = model._prepare_all(items)
    with torch.inference_mode():
        stages["vision tower"] = interleaved_median_ms({"v": lambda: model.backend.model.visual(on_dev, grids)}, dev,
                                                       iters, 1)["v"]
    backend = interleaved_median_ms({"b": lambda: model.encode_prepared(prepared, side="document")}, dev, iters, 1)["b"]
    stages["LM and the rest of the model"] = backend - stages["vision tower"]
    whole = interleaved_median_ms({"w": lambda: model.encode(items, side="document")}, dev, iters, 1)["w"]
    patches = int(pixels.shape[0])
    for stage, ms in stages.items():
        res.add(workload=workload, stage=stage, ms=ms, share_of_stages=ms / sum(stages.values()))
    res.add(workload=workload, stage="whole (wall, pipelined)", ms=whole, images_per_s=len(items) / whole * 1e3,
            patches_per_s=patches / whole * 1e3, pixels=proc.pixels)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="W2 / W2j on CUDA, bf16, Qwen2.5-VL-3B shapes")
    ap.add_argument("--model", choices=sorted(MODELS), help="default: 3b on a GPU, tiny on the CPU")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of C2's N-thread column")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="a quick check: no 4000x3000 input, 4 images per workload")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not native.native_available():
        sys.exit(f"bench_images: rematch_fast._C is not available ({native.WHY_NOT}); build it first (pip install .)")
    dev = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    arch, sizes = MODELS[args.model or ("3b" if args.gpu else "tiny")]
    c2_res, w2_res = Results(args.out, "images_c2"), Results(args.out, "images_w2")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", arch=arch, seed=0, dtype=dtype, device=dev, **sizes)
        model = ReMatch.from_pretrained(ckpt, backend="fast", device=dev, dtype=dtype)
        c2(c2_res, ImageProcessor(C2_SETTINGS), args.threads, args.iters, args.small)
        n2, n2j = (4, 4) if args.small else (64, 256) if args.gpu else (16, 32)
        w2_images = [photo(448, 448, 10 + i) for i in range(n2)]
        breakdown(w2_res, model, dev, "W2", [{"text": "a photo of", "image": im} for im in w2_images], w2_images,
                  args.iters)
        folder = Path(tmp) / "w2j"
        folder.mkdir()
        for i in range(n2j):
            (folder / f"{i}.jpg").write_bytes(jpeg(photo(1024, 768, 1000 + i)))
        files = sorted(folder.iterdir())
        breakdown(w2_res, model, dev, "W2j", [{"text": "a photo of", "image": f} for f in files], [], args.iters)
        sync(dev)
    table = c2_res.markdown(["input", "provider", "decode_ms", "ms_1_thread", "x_transformers", "threads",
                             "ms_per_image_n_threads", "scaling"]) + "\n\n" + w2_res.markdown(
        ["workload", "stage", "ms", "share_of_stages", "images_per_s", "patches_per_s", "pixels"])
    print(table)
    return table


if __name__ == "__main__":
    main()
