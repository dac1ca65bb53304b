"""Random-weight ReMatch checkpoints of the real architectures at tiny sizes.

They carry the real Qwen2 tokenizer and the real model classes (Qwen2.5-VL's
window-attention and full-attention vision blocks included), so every code
path runs as it would on ReMatch-3B, only smaller. Same seed, same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import REMATCH_CONFIG, open_checkpoint, save_head
from .config import ReMatchConfig
from .errors import InputError
from .head import ReMatchHead
from .tokenizer import build_qwen2_tokenizer_json

ARCHES = ("qwen2-vl", "qwen2.5-vl")
QWEN2_VOCAB = 151936  # Qwen2's padded vocabulary; the tokenizer uses ids < 151657

TINY_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vision_depth=2,
    vision_hidden_size=32,
    vision_num_heads=4,
    vision_intermediate_size=64,
    vision_window_size=56,  # pixels; 2x2 merged patches per window (the real model: 112)
    vision_fullatt_every=2,  # every n-th vision block attends over the whole image (the real model: 8)
    num_learnable_tokens=16,
    projector_hidden_size=64,
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 64,
    max_text_tokens=256,
)


def _mrope_section(head_dim: int) -> list[int]:
    # split head_dim/2 rotary frequencies into (t, h, w) like the real 16/24/24 of 128
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _hf_config(arch: str, s: dict):
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    if head_dim % 4 or s["hidden_size"] % s["num_attention_heads"]:
        raise InputError("hidden_size / num_attention_heads must be a whole multiple of 4")
    text = dict(
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        vocab_size=QWEN2_VOCAB,
        max_position_embeddings=32768,
        rope_scaling={"type": "mrope", "mrope_section": _mrope_section(head_dim)},
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    if arch == "qwen2-vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(
            depth=s["vision_depth"],
            embed_dim=s["vision_hidden_size"],
            num_heads=s["vision_num_heads"],
            mlp_ratio=max(1, s["vision_intermediate_size"] // s["vision_hidden_size"]),  # an int in transformers 5
            hidden_size=s["hidden_size"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return Qwen2VLForConditionalGeneration, Qwen2VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=True, **ids
        )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    depth = s["vision_depth"]
    vision = dict(
        depth=depth,
        hidden_size=s["vision_hidden_size"],
        intermediate_size=s["vision_intermediate_size"],
        num_heads=s["vision_num_heads"],
        out_hidden_size=s["hidden_size"],
        # like the real model: every few blocks attend over the full image, the rest within windows
        fullatt_block_indexes=[i for i in range(depth) if (i + 1) % s["vision_fullatt_every"] == 0] or [depth - 1],
        window_size=s["vision_window_size"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True, **ids
    )


def make_tiny_checkpoint(path: str | Path, arch: str = "qwen2.5-vl", seed: int = 0, dtype: torch.dtype = torch.float32,
                         device="cpu", **size_overrides) -> Path:
    """Write a random-weight ReMatch checkpoint to `path` and return it.

    `size_overrides` may change any key of TINY_SIZES (e.g. hidden_size=128,
    num_hidden_layers=4, max_pixels=...). `dtype` and `device` are for building
    full-size models quickly (e.g. bf16 on a GPU for benchmarks); the bytes are
    reproducible for one seed, dtype and device. The caller's torch RNG is untouched.
    """
    if arch not in ARCHES:
        raise InputError(f"arch must be one of {ARCHES}, got {arch!r}")
    unknown = set(size_overrides) - set(TINY_SIZES)
    if unknown:
        raise InputError(f"unknown size overrides {sorted(unknown)}; allowed: {sorted(TINY_SIZES)}")
    sizes = {**TINY_SIZES, **size_overrides}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    model_cls, hf_config = _hf_config(arch, sizes)
    rematch_config = ReMatchConfig(
        hidden_size=sizes["hidden_size"],
        num_learnable_tokens=sizes["num_learnable_tokens"],
        projector={"hidden_size": sizes["projector_hidden_size"], "activation": "gelu"},
        min_pixels=sizes["min_pixels"],
        max_pixels=sizes["max_pixels"],
        max_text_tokens=sizes["max_text_tokens"],
    )
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = model_cls._from_config(hf_config, dtype=dtype)
    model.save_pretrained(path)
    head = ReMatchHead(rematch_config)
    head.reset_parameters(torch.Generator().manual_seed(seed + 1))
    save_head(head, path)
    rematch_config.save(path / REMATCH_CONFIG)

    (path / "tokenizer.json").write_text(build_qwen2_tokenizer_json())
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "size": {"shortest_edge": sizes["min_pixels"], "longest_edge": sizes["max_pixels"]},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    open_checkpoint(path)  # what we wrote must load
    return path
