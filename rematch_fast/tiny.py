"""Random-weight ReMatch checkpoints of the real architectures at tiny sizes.

They carry the real Qwen2 tokenizer and the real model classes (Qwen2.5-VL's
window-attention and full-attention vision blocks included), so every code
path runs as it would on ReMatch-3B, only smaller. Same seed, same bytes.
`like=` a folder with a published config.json (and preprocessor_config.json)
copies that model's structure (architecture, activations, tying, rotary
settings, special token ids, image settings) at tiny sizes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import (ARCHES, ARCHITECTURES, PREPROCESSOR_CONFIG, REMATCH_CONFIG, open_checkpoint, save_head,
                         tie_word_embeddings_of, transformers_classes)
from .config import ReMatchConfig
from .errors import InputError
from .head import ReMatchHead
from .tokenizer import FIRST_SPECIAL_ID, QWEN2_VL_SPECIAL_TOKENS, build_qwen2_tokenizer_json

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
# the image settings of the published Qwen2-VL / Qwen2.5-VL preprocessor_config.json (pixel bounds set per model)
QWEN_IMAGE_SETTINGS = {
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def _special_id(token: str) -> int:
    return FIRST_SPECIAL_ID + QWEN2_VL_SPECIAL_TOKENS.index(token)


def _mrope_section(head_dim: int) -> list[int]:
    # split head_dim/2 rotary frequencies into (t, h, w) like the real 16/24/24 of 128
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def check_sizes(s: dict) -> None:
    """Sizes a real Qwen2-VL could have: heads that divide their widths into rotary-friendly parts."""
    for width, heads in (("hidden_size", "num_attention_heads"), ("vision_hidden_size", "vision_num_heads")):
        if s[width] % s[heads] or (s[width] // s[heads]) % 4:
            raise InputError(f"{width} / {heads} must be a whole multiple of 4, got {s[width]} / {s[heads]}")
    if s["num_attention_heads"] % s["num_key_value_heads"]:
        raise InputError(f"num_key_value_heads ({s['num_key_value_heads']}) must divide num_attention_heads "
                         f"({s['num_attention_heads']})")


def _hf_config(arch: str, s: dict, like: dict | None, tie: bool | None):
    """The model class and its config: the published one (`like`, read by transformers itself) or
    the default structure, with every size replaced by the tiny sizes `s`."""
    check_sizes(s)
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    model_cls, config_cls = transformers_classes(arch)
    if like is not None:
        published = config_cls.from_dict(like)
        text, vision = published.text_config.to_dict(), published.vision_config.to_dict()
        tie = tie_word_embeddings_of(like) if tie is None else tie
        ids = {k: like[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
               if k in like}
    else:
        text = dict(vocab_size=QWEN2_VOCAB, max_position_embeddings=32768, rope_scaling={"type": "mrope"},
                    bos_token_id=_special_id("<|endoftext|>"), eos_token_id=_special_id("<|im_end|>"))
        vision = dict(QWEN_IMAGE_SETTINGS, spatial_merge_size=2)
        del vision["merge_size"], vision["image_mean"], vision["image_std"]
        tie = True if tie is None else tie
        ids = dict(image_token_id=_special_id("<|image_pad|>"), video_token_id=_special_id("<|video_pad|>"),
                   vision_start_token_id=_special_id("<|vision_start|>"), vision_end_token_id=_special_id("<|vision_end|>"))
    text.update(hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                num_key_value_heads=s["num_key_value_heads"], tie_word_embeddings=tie)
    for derived in ("head_dim", "layer_types"):  # recomputed from the tiny sizes
        text.pop(derived, None)
    for key in ("rope_scaling", "rope_parameters"):  # the rotary sections follow the tiny head size
        if isinstance(text.get(key), dict):
            text[key] = {**text[key], "mrope_section": _mrope_section(head_dim)}
    depth = s["vision_depth"]
    if arch == "qwen2-vl":
        vision.update(depth=depth, embed_dim=s["vision_hidden_size"], num_heads=s["vision_num_heads"],
                      mlp_ratio=max(1, s["vision_intermediate_size"] // s["vision_hidden_size"]),  # an int in transformers 5
                      hidden_size=s["hidden_size"])
    else:
        # like the real model: every few blocks attend over the full image, the rest within windows
        vision.update(depth=depth, hidden_size=s["vision_hidden_size"], intermediate_size=s["vision_intermediate_size"],
                      num_heads=s["vision_num_heads"], out_hidden_size=s["hidden_size"], window_size=s["vision_window_size"],
                      fullatt_block_indexes=[i for i in range(depth) if (i + 1) % s["vision_fullatt_every"] == 0]
                      or [depth - 1])
    return model_cls, config_cls(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)


def _read_like(like) -> tuple[str, dict, dict | None]:
    """(arch, config.json, preprocessor_config.json or None) of a published model folder."""
    folder = Path(like)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"like={folder}: cannot read its config.json: {e}") from None
    if config.get("model_type") not in ARCHITECTURES:
        raise InputError(f"like={folder}: model_type {config.get('model_type')!r} is not one of {sorted(ARCHITECTURES)}")
    pre = folder / PREPROCESSOR_CONFIG
    return ARCHITECTURES[config["model_type"]], config, json.loads(pre.read_text()) if pre.is_file() else None


def make_tiny_checkpoint(path: str | Path, arch: str = "qwen2.5-vl", seed: int = 0, dtype: torch.dtype = torch.float32,
                         device="cpu", like: str | Path | None = None, tie_word_embeddings: bool | None = None,
                         **size_overrides) -> Path:
    """Write a random-weight ReMatch checkpoint to `path` and return it.

    `size_overrides` may change any key of TINY_SIZES (e.g. hidden_size=128,
    num_hidden_layers=4, max_pixels=...). `dtype` and `device` are for building
    full-size models quickly (e.g. bf16 on a GPU for benchmarks); the bytes are
    reproducible for one seed, dtype and device. The caller's torch RNG is untouched.
    `like`: a folder with a published config.json (its architecture replaces `arch`) and
    optionally its preprocessor_config.json, written as is (the tiny pixel bounds then
    narrow it from rematch_config.json). `tie_word_embeddings`: False gives the model an LM head
    of its own (default: tied, like the published 2B/3B; or as `like` has it).
    """
    like_config = like_pre = None
    if like is not None:
        arch, like_config, like_pre = _read_like(like)
    if arch not in ARCHES:
        raise InputError(f"arch must be one of {ARCHES}, got {arch!r}")
    unknown = set(size_overrides) - set(TINY_SIZES)
    if unknown:
        raise InputError(f"unknown size overrides {sorted(unknown)}; allowed: {sorted(TINY_SIZES)}")
    sizes = {**TINY_SIZES, **size_overrides}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    model_cls, hf_config = _hf_config(arch, sizes, like_config, tie_word_embeddings)
    # pixel bounds: in the preprocessor file of a model of our own; as a narrowing of a published one
    narrow = like_pre is not None
    rematch_config = ReMatchConfig(
        hidden_size=sizes["hidden_size"],
        num_learnable_tokens=sizes["num_learnable_tokens"],
        projector={"hidden_size": sizes["projector_hidden_size"], "activation": "gelu"},
        min_pixels=sizes["min_pixels"] if narrow else None,
        max_pixels=sizes["max_pixels"] if narrow else None,
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
    preprocessor = like_pre or {
        "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": sizes["min_pixels"],
        "max_pixels": sizes["max_pixels"],
        **QWEN_IMAGE_SETTINGS,
    }
    (path / PREPROCESSOR_CONFIG).write_text(json.dumps(preprocessor, indent=2) + "\n")
    open_checkpoint(path)  # what we wrote must load
    return path
