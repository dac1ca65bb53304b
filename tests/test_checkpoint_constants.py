"""Checkpoint-driven constants: the published Qwen2-VL-2B-Instruct and Qwen2.5-VL-3B-Instruct
config.json / preprocessor_config.json open with the right shapes and image settings, build a
tiny random model of the same structure, and bad or disagreeing files are refused."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import random_image
from rematch_fast import CheckpointError, Item, ReMatch, ReMatchConfig
from rematch_fast.checkpoint import Checkpoint, image_settings, open_checkpoint
from rematch_fast.model.config import model_config
from rematch_fast.tiny import make_tiny_checkpoint

PUBLISHED = Path(__file__).parent / "data" / "published"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# name: (arch, text shapes, vision shapes) as published
EXPECTED = {
    "qwen2-vl-2b-instruct": ("qwen2-vl",
                             dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                                  head_dim=128, mrope_section=(16, 24, 24), rope_theta=1e6, vocab_size=151936,
                                  tie_word_embeddings=True),
                             dict(dim=1280, depth=32, num_heads=16, intermediate_size=5120, hidden_act="quick_gelu",
                                  out_dim=1536, patch_size=14, merge_size=2, window_size=0, fullatt_blocks=())),
    "qwen2.5-vl-3b-instruct": ("qwen2.5-vl",
                               dict(hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16, num_kv_heads=2,
                                    head_dim=128, mrope_section=(16, 24, 24), rope_theta=1e6, vocab_size=151936,
                                    tie_word_embeddings=True),
                               dict(dim=1280, depth=32, num_heads=16, intermediate_size=3420, hidden_act="silu",
                                    out_dim=2048, patch_size=14, merge_size=2, window_size=112,
                                    fullatt_blocks=(7, 15, 23, 31))),
}


def _published_checkpoint(name: str) -> Checkpoint:
    """The published JSON read the way open_checkpoint reads it (no weights needed for the shapes)."""
    folder = PUBLISHED / name
    config = json.loads((folder / "config.json").read_text())
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    arch = EXPECTED[name][0]
    hidden = EXPECTED[name][1]["hidden_size"]
    return Checkpoint(folder, arch, config, ReMatchConfig(hidden_size=hidden), pre)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_published_configs_give_the_real_shapes(name):
    arch, text, vision = EXPECTED[name]
    ckpt = _published_checkpoint(name)
    cfg = model_config(ckpt)
    assert cfg.arch == arch
    for key, value in text.items():
        assert getattr(cfg.text, key) == value, key
    for key, value in vision.items():
        assert getattr(cfg.vision, key) == value, key
    s = ckpt.image_settings
    assert (s.min_pixels, s.max_pixels) == (3136, 12845056)
    assert (s.patch_size, s.temporal_patch_size, s.merge_size) == (14, 2, 2)
    assert s.image_mean == CLIP_MEAN and s.image_std == CLIP_STD


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tiny_model_of_the_published_structure(name, tmp_path):
    """A tiny random model built `like` the published files opens, keeps their structure, and
    the fast backend equals the reference on it."""
    arch, text, vision = EXPECTED[name]
    path = make_tiny_checkpoint(tmp_path / name, like=PUBLISHED / name, seed=3)
    ckpt = open_checkpoint(path)
    cfg = model_config(ckpt)
    assert ckpt.arch == arch and cfg.text.tie_word_embeddings == text["tie_word_embeddings"]
    assert cfg.vision.hidden_act == vision["hidden_act"] and cfg.text.rope_theta == text["rope_theta"]
    assert cfg.text.num_kv_heads < cfg.text.num_heads  # grouped-query attention, as published
    assert bool(cfg.vision.fullatt_blocks) == bool(vision["fullatt_blocks"])
    assert cfg.vision.window_size > 0 if vision["window_size"] else cfg.vision.window_size == 0
    # the published preprocessor file is kept as is; rematch_config.json narrows its pixel bounds
    assert json.loads((path / "preprocessor_config.json").read_text()) == \
        json.loads((PUBLISHED / name / "preprocessor_config.json").read_text())
    s = ckpt.image_settings
    assert s.max_pixels == ckpt.config.max_pixels < 12845056 and s.image_std == CLIP_STD
    items = ["a short text", Item(text="a photo", image=random_image(97, 213, 5))]
    ref = ReMatch.from_pretrained(path).encode(items)
    fast = ReMatch.from_pretrained(path, backend="fast").encode(items)
    torch.testing.assert_close(fast.unit, ref.unit, atol=1e-4, rtol=0)


def _settings(pre: dict, **narrow):
    return image_settings(pre, {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
                          ReMatchConfig(hidden_size=8, **narrow))


def test_pixel_bounds_may_only_be_narrowed():
    pre = json.loads((PUBLISHED / "qwen2-vl-2b-instruct" / "preprocessor_config.json").read_text())
    assert (_settings(pre).min_pixels, _settings(pre).max_pixels) == (3136, 12845056)
    s = _settings(pre, min_pixels=10_000, max_pixels=50_000)
    assert (s.min_pixels, s.max_pixels) == (10_000, 50_000)
    s = _settings(pre, min_pixels=100, max_pixels=10**9)  # wider than the file: the file's bounds stay
    assert (s.min_pixels, s.max_pixels) == (3136, 12845056)
    with pytest.raises(CheckpointError, match="only narrow"):
        _settings(pre, max_pixels=1000)
    # transformers 5's layout of the same file
    new = {k: v for k, v in pre.items() if k not in ("min_pixels", "max_pixels")}
    new["size"] = {"shortest_edge": 5000, "longest_edge": 60000}
    assert (_settings(new).min_pixels, _settings(new).max_pixels) == (5000, 60000)


@pytest.mark.parametrize("change, match", [
    (lambda pre, cfg: pre.pop("max_pixels"), "pixel bounds"),
    (lambda pre, cfg: pre.update(image_std=[0.2, 0.2]), "image_std"),
    (lambda pre, cfg: pre.update(patch_size=16), "patch_size=16"),
    (lambda pre, cfg: pre.update(merge_size=3), "merge_size=3"),
    (lambda pre, cfg: cfg.update(image_token_id=151654), "image_token_id=151654"),
    (lambda pre, cfg: cfg.update(vision_start_token_id=7), "vision_start_token_id"),
])
def test_bad_or_disagreeing_files_are_refused(tiny_paths, tmp_path, change, match):
    path = tmp_path / "c"
    shutil.copytree(tiny_paths["qwen2.5-vl"], path)
    pre = json.loads((path / "preprocessor_config.json").read_text())
    cfg = json.loads((path / "config.json").read_text())
    change(pre, cfg)
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        ReMatch.from_pretrained(path)


def test_missing_preprocessor_config_is_named(tiny_paths, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(tiny_paths["qwen2-vl"], path)
    (path / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json is missing"):
        open_checkpoint(path)


def test_image_settings_reach_the_patches(tiny_paths, tmp_path):
    """Mean and std come from the checkpoint's file: other values give other pixel patches."""
    path = tmp_path / "c"
    shutil.copytree(tiny_paths["qwen2-vl"], path)
    image = random_image(64, 80, 9)
    before = ReMatch.from_pretrained(path).prepare(Item(image=image)).pixel_values
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    after = ReMatch.from_pretrained(path).prepare(Item(image=image)).pixel_values
    # the same 8-bit pixels, normalized two ways: (x - m1) / s1 vs (x - m2) / s2
    c = torch.tensor(CLIP_MEAN).repeat_interleave(2 * 14 * 14)
    s = torch.tensor(CLIP_STD).repeat_interleave(2 * 14 * 14)
    torch.testing.assert_close(after, ((before * s + c) - 0.5) / 0.5, atol=1e-4, rtol=0)
