"""Bad input gets a clear, typed error and loses nothing; odd images are converted, not rejected."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_image
from rematch_fast import EmptyItemError, ImageError, InputError, Item, TruncationWarning
from rematch_fast.images import load_image


@pytest.mark.parametrize("bad", [Item, lambda: {"text": "   "}, lambda: ""])
def test_empty_item(model, bad):
    with pytest.raises(EmptyItemError, match="empty"):
        model.embed([bad()])


def test_wrong_item_types():
    with pytest.raises(InputError):
        Item(text=3)
    with pytest.raises(InputError):
        Item(image=b"bytes")


def test_missing_and_corrupt_image_files(model, tmp_path):
    with pytest.raises(ImageError, match="not found"):
        model.embed([Item(image=tmp_path / "nope.png")])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage that is not an image")
    with pytest.raises(ImageError, match="cannot be decoded"):
        model.embed([Item(image=str(tmp_path / "bad.png"))])
    good = tmp_path / "cut.png"
    random_image(64, 64, seed=3).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])  # truncated file
    with pytest.raises(ImageError):
        model.embed([Item(image=good)])


def test_error_names_the_bad_item(model, tmp_path):
    with pytest.raises(ImageError, match="item 1"):
        model.embed(["fine", Item(image=tmp_path / "missing.jpg")])


def _modes(seed):
    rgb = random_image(90, 70, seed=seed)
    a16 = (np.random.default_rng(seed).integers(0, 65535, size=(70, 90))).astype(np.uint16)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.random.default_rng(seed + 1).integers(0, 256, (70, 90), dtype=np.uint8)))
    return {
        "L": rgb.convert("L"), "1": rgb.convert("1"), "P": rgb.convert("P"), "RGBA": rgba,
        "LA": rgba.convert("LA"), "CMYK": rgb.convert("CMYK"), "I;16": Image.fromarray(a16),
        "F": Image.fromarray(a16.astype(np.float32) / 65535),
    }


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK", "I;16", "F"])
def test_unusual_modes_are_converted(model, mode, tmp_path):
    im = _modes(7)[mode]
    assert im.mode == mode
    rgb = load_image(im)
    assert rgb.mode == "RGB" and rgb.size == im.size
    e = model.embed([Item(image=im)])
    assert torch.isfinite(e).all() and abs(float(e.norm()) - 1) < 1e-5
    if mode in ("L", "RGBA", "CMYK", "I;16"):  # these round-trip through files too
        path = tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
        im.save(path)
        torch.testing.assert_close(model.embed([Item(image=path)]), e, atol=1e-5, rtol=0)


def test_16bit_keeps_its_contrast():
    a = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    out = np.asarray(load_image(Image.fromarray(a)))
    assert out.min() == 0 and out.max() == 255


def test_rgba_is_composited_on_white():
    im = Image.new("RGBA", (40, 40), (10, 20, 30, 0))  # fully transparent
    assert np.asarray(load_image(im)).min() == 255


def test_huge_image_is_resized_within_pixel_limits(model):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8))
    p = model.prepare(Item(image=big))
    t, h, w = p.grid_thw
    assert h * w * 14 * 14 <= model.checkpoint.image_settings.max_pixels
    assert p.pixel_values.shape[0] == t * h * w
    assert abs(w / h - 4 / 3) < 0.35


def test_tiny_and_extreme_aspect_images(model):
    for w, h in [(5, 5), (28, 28), (1000, 30), (3000, 4)]:
        p = model.prepare(Item(image=random_image(w, h, seed=w)))
        t, gh, gw = p.grid_thw
        assert model.checkpoint.image_settings.min_pixels <= gh * gw * 196 <= model.checkpoint.image_settings.max_pixels


def test_long_text_is_truncated_with_a_warning(model):
    limit = model.config.max_text_tokens
    long_text = " ".join(f"w{i}" for i in range(limit * 2))
    with pytest.warns(TruncationWarning, match=f"max_text_tokens={limit}"):
        p = model.prepare(long_text)
    assert p.truncated and len(p.text_ids) == limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        cut = model.preprocessor.tok.text.decode(p.text_ids)
        torch.testing.assert_close(model.embed([long_text]), model.embed([cut]), atol=1e-5, rtol=0)
        at_limit = model.prepare("word" + " word" * (limit - 1))  # exactly at the limit: kept whole
    assert not at_limit.truncated and len(at_limit.text_ids) == limit


def test_unknown_item_kind(model):
    with pytest.raises(InputError, match="an item is"):
        model.embed([3.5])
    with pytest.raises(InputError, match="side"):
        model.embed(["x"], side="both")
