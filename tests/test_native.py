"""The C++ image preparation (rematch_fast._C) against the pure-Python path and transformers' own
processor: the same bytes for random sizes, modes and aspect ratios; Pillow-exact resampling; the
batch call equal to one image at a time; the fallback, with its warning, when the extension is
missing."""
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from conftest import random_image
from rematch_fast import native
from rematch_fast.checkpoint import ImageSettings
from rematch_fast.images import ImageProcessor, load_image

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # Qwen2-VL's


def settings(min_pixels=3136, max_pixels=1280 * 28 * 28):
    return ImageSettings(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2,
                         merge_size=2, image_mean=MEAN, image_std=STD)


def photo(w, h, seed, mode="RGB"):
    """Smooth content plus noise (resampling must round like Pillow on gradients, not only noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w, 1)), (y * 255 // max(h, 1)), ((x + y) * 127 // max(w + h, 1))], axis=-1)
    a = np.clip(base + rng.integers(-40, 41, size=(h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(a, "RGB")
    return im if mode == "RGB" else im.convert(mode)


def test_the_extension_is_built():
    """CI builds it from a clean clone (setup.py runs CMake): a missing extension fails here, with the reason."""
    assert native.native_available(), native.WHY_NOT


needs_native = pytest.mark.skipif(not native.native_available(), reason=f"rematch_fast._C: {native.WHY_NOT}")


def cases(n, seed):
    """Random (image, settings): sizes from 1x1 to photo size, extreme aspect ratios, any mode."""
    rng = np.random.default_rng(seed)
    modes = ["RGB", "RGB", "RGB", "L", "RGBA", "P", "CMYK", "LA", "1", "I;16"]
    fixed = [(1, 1), (1, 400), (400, 1), (3, 2000), (2000, 3), (4000, 3000), (29, 27), (56, 56), (28, 28)]
    for i in range(n):
        if i < len(fixed):
            w, h = fixed[i]
        elif i % 5 == 0:  # long and thin
            w, h = int(rng.integers(1, 60)), int(rng.integers(200, 3000))
            w, h = (w, h) if i % 2 else (h, w)
        else:
            w, h = (int(v) for v in rng.integers(1, 900, size=2))
        mode = modes[i % len(modes)]
        pick = i % 3
        s = (settings(), settings(max_pixels=12845056) if max(w, h) < 1200 else settings(),
             settings(min_pixels=200704))[pick]  # the 3B's bounds; a large minimum: upscaling
        yield photo(w, h, seed + i, mode if mode != "I;16" else "L"), s, mode


@needs_native
def test_native_and_python_paths_equal_transformers_processor(monkeypatch):
    """240 images: the native path, the pure-Python path and transformers' processor on the same
    bounded image give identical patches and grids."""
    checked = 0
    for im, s, mode in cases(240, seed=20261127):
        if mode == "I;16":
            im = Image.fromarray(np.asarray(im, dtype=np.uint16) * 257)
        proc = ImageProcessor(s)
        rgb = load_image(im, max_pixels=s.max_pixels)
        bounded = proc._bound(rgb)
        want = proc.hf(images=[bounded], return_tensors="pt")
        got_pixels, got_grid = proc(rgb)
        with monkeypatch.context() as m:
            m.setattr(native, "_C", None)
            m.setattr(native, "_warned", True)  # the warning has its own test
            py_pixels, py_grid = proc(rgb)
        grid = tuple(int(v) for v in want["image_grid_thw"][0])
        assert got_grid == py_grid == grid, (im.size, mode)
        assert got_pixels.dtype == py_pixels.dtype == torch.float32
        assert torch.equal(got_pixels, want["pixel_values"].float()), (im.size, mode, s)
        assert torch.equal(py_pixels, got_pixels), (im.size, mode, s)
        checked += 1
    assert checked == 240


def order_class(version: int) -> int:
    """Pillow versions (major * 100 + minor) that order their resize passes alike."""
    return 2 if version >= 1300 else 1 if version >= 1202 else 0


@needs_native
@pytest.mark.parametrize("pillow", [1201, 1203, 1300])
def test_resampling_is_pillows_bicubic_byte_for_byte(pillow):
    """Up, down, one axis, both axes in every combination, 1-pixel sides, images 100+ times taller
    than wide. Pillow changed its pass order in 12.2 and in 13.0, which changes the bytes: the
    installed Pillow's order is matched exactly; each other order must differ somewhere."""
    rng = np.random.default_rng(5 + pillow)
    shapes = [tuple(int(v) for v in rng.integers(1, 260, size=4)) for _ in range(300)]
    shapes += [(int(rng.integers(300, 3000)), int(rng.integers(1, 3)), int(rng.integers(30, 290)),
                int(rng.integers(1, 40))) for _ in range(30)]  # (h, w, out_h, out_w): tall and thin
    differ = 0
    for i, (h, w, oh, ow) in enumerate(shapes):
        if i % 7 == 0:
            oh = h  # one axis only
        a = np.asarray(photo(w, h, seed=i))
        want = np.asarray(Image.fromarray(a).resize((ow, oh), Image.Resampling.BICUBIC))
        got = native._C.resize_bicubic(a, oh, ow, pillow)
        if order_class(pillow) == order_class(native.PILLOW_VERSION):
            assert np.array_equal(got, want), (h, w, oh, ow)
        else:
            differ += not np.array_equal(got, want)
    assert order_class(pillow) == order_class(native.PILLOW_VERSION) or differ > 0  # the order is chosen


@needs_native
def test_smart_resize_is_qwen2_vls_rule():
    rng = np.random.default_rng(3)
    for i in range(3000):
        h, w = (int(v) for v in rng.integers(1, 6000, size=2))
        lo, hi = [(3136, 1003520), (3136, 12845056), (200704, 1003520)][i % 3]
        try:
            want = smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
        except ValueError:
            with pytest.raises(ValueError, match="aspect ratio"):
                native._C.smart_resize(h, w, 28, lo, hi)
            continue
        assert tuple(native._C.smart_resize(h, w, 28, lo, hi)) == want, (h, w, lo, hi)


@needs_native
def test_batch_equals_one_at_a_time_and_uint8_patches_are_the_pixels():
    """prepare_batch on 3 threads into one buffer equals prepare image by image; uint8 patches,
    normalized and repeated per frame as the processor does, are the float patches exactly."""
    C, s = native._C, settings()
    images = [np.asarray(photo(w, h, seed=w)) for w, h in [(97, 41), (640, 480), (1, 1), (333, 1000), (56, 56)]]
    sizes = [tuple(C.smart_resize(a.shape[0], a.shape[1], 28, s.min_pixels, s.max_pixels)) for a in images]
    args = (14, 2, 2, list(MEAN), list(STD), native.PILLOW_VERSION)
    one = [C.prepare(a, h, w, *args) for a, (h, w) in zip(images, sizes)]
    rows = sum(p.shape[0] for p in one)
    out = np.full((rows, 3 * 2 * 14 * 14), np.nan, dtype=np.float32)
    C.prepare_batch(images, sizes, *args, out, 3)
    assert np.array_equal(out, np.concatenate(one))
    raw = np.zeros((rows, 3 * 14 * 14), dtype=np.uint8)
    C.prepare_batch(images, sizes, *args, raw, 2)
    scaled = (raw.astype(np.float64) * (1 / 255)).astype(np.float32).reshape(rows, 3, 1, 14 * 14)
    normalized = (scaled - np.float32(MEAN)[:, None, None].astype(np.float32)) / np.float32(STD)[:, None, None]
    assert np.array_equal(np.broadcast_to(normalized, (rows, 3, 2, 196)).reshape(rows, -1), out)
    with pytest.raises(ValueError, match="rows"):
        C.prepare_batch(images, sizes, *args, out[:-1], 2)
    with pytest.raises(ValueError, match="RGB image"):
        C.prepare(np.zeros((4, 4), np.uint8), 28, 28, *args)
    with pytest.raises(ValueError, match="28-pixel blocks"):
        C.prepare(images[0], 30, 28, *args)
    with pytest.raises(ValueError, match="28-pixel blocks"):  # checked before any work
        C.prepare_batch(images[:2], [sizes[0], (0, 28)], *args, out, 2)
    with pytest.raises(ValueError, match="positive"):
        C.resize_bicubic(np.zeros((0, 5, 3), np.uint8), 3, 3, native.PILLOW_VERSION)
    with pytest.raises(TypeError):  # never a silent cast of another dtype
        C.resize_bicubic(np.random.default_rng(0).random((10, 10, 3)), 10, 10, native.PILLOW_VERSION)
    with pytest.raises(ValueError, match="out of range"):  # patch * merge would overflow
        C.prepare(images[0], 28, 28, 65536, 1, 65536, list(MEAN), list(STD), native.PILLOW_VERSION)
    with pytest.raises(ValueError, match="max_pixels"):
        C.smart_resize(100, 100, 28, 3136, 0)
    transposed = np.asfortranarray(images[1])  # any layout of uint8 is copied, not refused
    assert np.array_equal(C.prepare(transposed, *sizes[1], *args), one[1])


def test_without_the_extension_the_python_path_runs_with_one_warning(monkeypatch):
    """Simulated absence: the same patches, one NativeUnavailableWarning per process that says why;
    REMATCH_FAST_NO_NATIVE=1 turns the extension off in a fresh process."""
    proc = ImageProcessor(settings())
    im = random_image(300, 170, seed=2)
    want = proc(im)
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "WHY_NOT", "simulated: not built")
    monkeypatch.setattr(native, "_warned", False)
    with pytest.warns(native.NativeUnavailableWarning, match="simulated: not built.*pure-Python path"):
        got = proc(im)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = proc(im)  # once per process
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and torch.equal(again[0], want[0])
    assert not native.native_available()
    code = "import rematch_fast; print(rematch_fast.native_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "REMATCH_FAST_NO_NATIVE": "1"})
    assert out.stdout.strip() == "False"


@needs_native
def test_uint8_patches_native_and_python_agree(monkeypatch):
    for im, s, mode in cases(60, seed=77):
        proc = ImageProcessor(s, pixels="uint8")
        rgb = load_image(im, max_pixels=s.max_pixels)
        got, grid = proc(rgb)
        with monkeypatch.context() as m:
            m.setattr(native, "_C", None)
            m.setattr(native, "_warned", True)
            want, want_grid = proc(rgb)
        assert got.dtype == want.dtype == torch.uint8 and got.shape[1] == 3 * 14 * 14
        assert grid == want_grid and torch.equal(got, want), (im.size, mode)
        floats, float_grid = ImageProcessor(s)(rgb)
        assert float_grid == grid and floats.shape[0] == got.shape[0]


@pytest.mark.parametrize("quantize", [None, "int8-weight"])
def test_the_folded_patch_embedding_equals_the_float_path(tiny_paths, arch, quantize):
    """uint8_pixels=True: raw pixels in, normalization and frame repetition folded into the patch
    embedding; against the processor's float patches through the same model (fp32 policy, 1e-4),
    for embeddings and p(yes), plain and with quantized weights (folded from whatever format)."""
    from rematch_fast import Item, ReMatch

    options = {"quantize": quantize} if quantize else {}
    floats = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", **options)
    raw = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", uint8_pixels=True, **options)
    assert floats.backend.pixels == "float32" and raw.backend.pixels == "uint8"
    items = [Item(image=random_image(97, 41, seed=3)), Item(text="a caption", image=random_image(300, 200, seed=4)),
             "only text", Item(image=random_image(28, 900, seed=5))]
    assert raw.prepare(items[0]).pixel_values.dtype == torch.uint8
    got, want = raw.encode(items).unit, floats.encode(items).unit
    assert (got - want).abs().max() <= 1e-4 and not torch.equal(got[:2], torch.zeros_like(got[:2]))
    torch.testing.assert_close(raw.match("a query", items), floats.match("a query", items), atol=1e-4, rtol=0)
    tower = raw.backend.model.visual
    pixels, _ = ImageProcessor(raw.checkpoint.image_settings, pixels="uint8")(random_image(56, 84, seed=6))
    normalized, _ = ImageProcessor(raw.checkpoint.image_settings)(random_image(56, 84, seed=6))
    with torch.no_grad():
        a, b = tower.patch_embed_uint8(pixels.float()), tower.patch_embed(normalized)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_any_mode_and_very_thin_images_take_both_paths_alike(monkeypatch):
    """A non-RGB image handed to the processor directly is converted first on both paths; a
    200,000 x 1 image is shrunk along its long side before it is padded (a canvas within
    HEADROOM x max_pixels, not 760 MB), the same way on both paths."""
    proc = ImageProcessor(settings())
    thin = photo(200_000, 1, seed=3)
    for im in [photo(300, 170, seed=1, mode="L"), photo(97, 41, seed=2, mode="RGBA"), thin, thin.rotate(90, expand=True)]:
        got, grid = proc(im)
        with monkeypatch.context() as m:
            m.setattr(native, "_C", None)
            m.setattr(native, "_warned", True)
            want, want_grid = proc(im)
        assert grid == want_grid and torch.equal(got, want), im.size
        assert grid[1] * grid[2] * 14 * 14 <= settings().max_pixels
    bounded = proc._bound(thin)
    assert bounded.width * bounded.height <= 4 * settings().max_pixels
