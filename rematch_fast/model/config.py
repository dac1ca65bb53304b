"""The model shapes rematch_fast needs, read from a checkpoint's config.json (through
rematch_fast.checkpoint, which knows both of its layouts)."""
from __future__ import annotations

from dataclasses import dataclass

from ..checkpoint import Checkpoint


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    vocab_size: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class VisionConfig:
    arch: str  # "qwen2-vl" (LayerNorm, fc1/fc2 MLP) or "qwen2.5-vl" (RMSNorm, gated MLP, window attention)
    dim: int
    depth: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    out_dim: int  # the decoder's hidden size
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    window_size: int  # in pixels (qwen2.5-vl); 0 for qwen2-vl
    fullatt_blocks: tuple[int, ...]
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    text: TextConfig
    vision: VisionConfig


def _rope(d: dict) -> dict:
    return d.get("rope_parameters") or d.get("rope_scaling") or {}


def model_config(ckpt: Checkpoint) -> ModelConfig:
    arch, t, v = ckpt.arch, ckpt.text_config, ckpt.vision_config
    rope = _rope(t)
    heads = t["num_attention_heads"]
    text = TextConfig(
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or t["hidden_size"] // heads,
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta") or t.get("rope_theta") or 1_000_000.0,
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        vocab_size=t["vocab_size"],
        tie_word_embeddings=ckpt.tie_word_embeddings,
    )
    if arch == "qwen2-vl":
        dim = v["embed_dim"]
        vision = VisionConfig(arch, dim, v["depth"], v["num_heads"], int(dim * v.get("mlp_ratio", 4)),
                              v.get("hidden_act", "quick_gelu"), v["hidden_size"], v.get("patch_size", 14),
                              v.get("temporal_patch_size", 2), v.get("spatial_merge_size", 2), 0, (),
                              _rope(v).get("rope_theta", 10000.0))
    else:
        vision = VisionConfig(arch, v["hidden_size"], v["depth"], v["num_heads"], v["intermediate_size"],
                              v.get("hidden_act", "silu"), v["out_hidden_size"], v.get("patch_size", 14),
                              v.get("temporal_patch_size", 2), v.get("spatial_merge_size", 2),
                              v.get("window_size", 112), tuple(v.get("fullatt_block_indexes", ())),
                              _rope(v).get("rope_theta", 10000.0))
    for what, width, heads in (("decoder", text.num_heads * text.head_dim, text.num_heads),
                               ("vision tower", vision.dim, vision.num_heads)):
        if width % heads:
            raise ValueError(f"the {what}'s width {width} does not divide into {heads} heads")
    if text.num_heads % text.num_kv_heads:
        raise ValueError(f"num_key_value_heads {text.num_kv_heads} does not divide num_attention_heads {text.num_heads}")
    return ModelConfig(arch, text, vision)
