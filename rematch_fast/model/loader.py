"""Build the lean model and fill it straight from the checkpoint's safetensors.

Both key layouts are read: the original Qwen2-VL one (`model.layers...`, `visual...`)
and transformers 5's (`model.language_model...`, `model.visual...`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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
        # row by row: indexing with a list would copy it to the device from pageable memory, a blocking
        # copy that drains the queued match batches (found by test_cuda_fast's sync-debug test on an H200)
        return torch.stack([w[int(i)] for i in ids])


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


# quantized weights are read as they are: a cast between these formats would be silent nonsense
_QUANTIZED_DTYPES = {torch.int8: "I8", torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8"}


def _placements(path: str | Path, model: QwenVL, device: str = "cpu", ours: bool = False):
    """Match every checkpoint tensor to its place in `model`, reading headers only; yields
    (open file, key, destination view) and raises CheckpointError for a tensor with no place,
    a wrong shape, a missing one, or a file that cannot be read (truncated, not safetensors).
    ours: the files hold our own state dict (a pre-quantized checkpoint: our names, fused)."""
    files = sorted(Path(path).glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no model*.safetensors weights")
    tied = model.cfg.text.tie_word_embeddings
    params = model.state_dict()
    fused = {} if ours else _fused_parts(model)
    # every checkpoint tensor we need: our own names, with fused ones replaced by their parts
    targets = {n: (n, slice(None)) for n in params if n not in {t for t, _ in fused.values()}} | fused
    seen = set()
    for f in files:
        try:
            sf = safe_open(str(f), framework="pt", device=device)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f} cannot be read as safetensors (truncated or damaged?): {e}") from None
        with sf:
            for key in sf.keys():
                name = key if ours else _our_name(key)
                if name is None or (name == "lm_head.weight" and tied):
                    continue
                if name not in targets:
                    raise CheckpointError(f"{f.name}: weight {key!r} has no place in the {model.cfg.arch} model")
                target, rows = targets[name]
                dest = params[target][rows]
                shape = sf.get_slice(key).get_shape()
                if name == "visual.patch_embed.weight" and not ours:  # Conv3d kernel == stride: a plain matmul
                    shape = [shape[0], math.prod(shape[1:])]
                if tuple(shape) != tuple(dest.shape):
                    raise CheckpointError(f"{f.name}: {key} has shape {tuple(shape)}, the config needs {tuple(dest.shape)}")
                stored = sf.get_slice(key).get_dtype()
                if ours and dest.dtype in _QUANTIZED_DTYPES and stored != _QUANTIZED_DTYPES[dest.dtype]:
                    raise CheckpointError(f"{f.name}: {key} is stored as {stored}, its preset needs "
                                          f"{_QUANTIZED_DTYPES[dest.dtype]}: is quantization.json this folder's own?")
                seen.add(name)
                yield sf, key, dest
    missing = sorted(set(targets) - seen)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} weights the config needs are missing from the safetensors "
                              f"files, e.g. {missing[:4]}: is config.json the one these weights were saved with?")


def _build(cfg: ModelConfig, ops: Ops, preset: str | None) -> QwenVL:
    """The model on the meta device; for a pre-quantized checkpoint, with `preset`'s layers."""
    from .quant import quantize_linears

    with torch.device("meta"):
        model = QwenVL(cfg, ops)
        if preset:
            quantize_linears(model, preset)
    return model


def check_weights(path: str | Path, cfg: ModelConfig, preset: str | None = None) -> None:
    """Every tensor the config implies is present with the right shape (headers only; no weights
    read). preset: the files are a pre-quantized checkpoint's (rematch-fast quantize)."""
    from ..ops import TORCH_OPS

    for _ in _placements(path, _build(cfg, TORCH_OPS, preset), ours=bool(preset)):
        pass


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter and buffer uninitialized storage on `device` (parameters in `dtype`).
    Plain torch.empty, not Module.to_empty: that goes through torch's Python meta kernels, whose
    first use imports about half a second of modules."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                                    requires_grad=False)
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device=device)


def load_model(path: str | Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, ops: Ops,
               preset: str | None = None) -> QwenVL:
    """The model built with `ops` (rematch_fast.ops.select_ops) and filled from the safetensors in
    `path`; preset: the files are a pre-quantized checkpoint's, read as they are."""
    model = _build(cfg, ops, preset)
    _materialize(model, device, dtype)
    with torch.no_grad():
        for sf, key, dest in _placements(path, model, str(device), ours=bool(preset)):
            dest.copy_(sf.get_tensor(key).reshape(dest.shape))
    model.visual.reset_buffers()
    model.decoder.reset_buffers()
    return model.eval()
