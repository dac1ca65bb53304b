"""Build the lean model and fill it straight from the checkpoint's safetensors.

Both key layouts are read: the original Qwen2-VL one (`model.layers...`, `visual...`)
and transformers 5's (`model.language_model...`, `model.visual...`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError
from ..ops import Ops
from .config import ModelConfig
from .decoder import Decoder
from .layers import FusedLinear
from .vision import VisionTower


class QwenVL(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.visual = VisionTower(cfg.vision, ops)
        self.decoder = Decoder(cfg.text, ops)
        if not cfg.text.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def output_rows(self, ids) -> torch.Tensor:
        """Rows of the LM head (the embedding matrix when tied): [len(ids), d]."""
        w = self.decoder.embed_tokens.weight if self.cfg.text.tie_word_embeddings else self.lm_head.weight
        return w[list(ids)]


def _our_name(key: str) -> str | None:
    key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
    if key.startswith("lm_head."):
        return key
    if key.startswith("model."):
        return "decoder." + key[len("model."):].replace(".self_attn.", ".")
    if key.startswith("visual."):
        key = key.replace(".attn.", ".").replace("patch_embed.proj.", "patch_embed.")
        return key.replace("merger.mlp.0.", "merger.fc1.").replace("merger.mlp.2.", "merger.fc2.")
    return None


def _fused_parts(model: nn.Module) -> dict[str, tuple[str, slice]]:
    """Checkpoint parameter names that fill rows of one of our fused projections:
    e.g. "decoder.layers.0.q_proj.weight" -> ("decoder.layers.0.qkv_proj.weight", rows)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FusedLinear):
            parent = name.rpartition(".")[0]
            for part in module.parts:
                for param, _ in module.named_parameters(recurse=False):
                    out[f"{parent}.{part}.{param}"] = (f"{name}.{param}", module.rows(part))
    return out


def load_model(path: str | Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, ops: Ops) -> QwenVL:
    """The model built with `ops` (rematch_fast.ops.select_ops) and filled from the safetensors in `path`."""
    files = sorted(Path(path).glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no model*.safetensors weights")
    with torch.device("meta"):
        model = QwenVL(cfg, ops)
    model = model.to_empty(device=device).to(dtype)
    params = model.state_dict()
    fused = _fused_parts(model)
    # every checkpoint tensor we need: our own names, with fused ones replaced by their parts
    targets = {n: (n, slice(None)) for n in params if n not in {t for t, _ in fused.values()}} | fused
    seen = set()
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for key in sf.keys():
                    name = _our_name(key)
                    if name is None or (name == "lm_head.weight" and cfg.text.tie_word_embeddings):
                        continue
                    if name not in targets:
                        raise CheckpointError(f"{f.name}: weight {key!r} has no place in the {cfg.arch} model")
                    t = sf.get_tensor(key)
                    if name == "visual.patch_embed.weight":
                        t = t.reshape(t.shape[0], -1)  # Conv3d kernel == stride: a plain matmul
                    target, rows = targets[name]
                    dest = params[target][rows]
                    if t.shape != dest.shape:
                        raise CheckpointError(f"{f.name}: {key} has shape {tuple(t.shape)}, "
                                              f"the config needs {tuple(dest.shape)}")
                    dest.copy_(t)
                    seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        raise CheckpointError(f"{path}: weights missing from the safetensors files: {missing[:8]}")
    model.visual.reset_buffers()
    model.decoder.reset_buffers()
    return model.eval()
