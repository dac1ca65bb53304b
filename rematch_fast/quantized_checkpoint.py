"""`rematch-fast quantize`: a checkpoint -> a pre-quantized checkpoint.

The folder written holds the source's config, tokenizer, preprocessor and head files as they
are, `model.safetensors` with the fast model's own state dict after quantization (our layer
names, q/k/v and gate/up fused; int8 weights with their fp32 scales; the rest in the chosen
dtype), and `quantization.json` (preset, dtype, the source's fingerprint). Loading it reads the
quantized weights as they are: no quantizing, half of the linear layers' bf16 bytes (a quarter
of fp32's) on disk and in host memory, and, opened in the dtype it was written in, exactly the
model that quantizing at load time gives. It runs on backend="fast" only (transformers cannot
read it).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .checkpoint import QUANTIZED_MANIFEST
from .errors import InputError
from .folders import check_replaceable, staged_folder

FORMAT_VERSION = 1


def quantize_checkpoint(checkpoint: str | Path, out: str | Path, preset: str, dtype: torch.dtype = torch.bfloat16,
                        overwrite: bool = False) -> Path:
    """Write `checkpoint` quantized with `preset` (rematch_fast.model.quant.PRESETS, not bf16) to
    `out` (refused if it holds anything, unless `overwrite` and it is a pre-quantized checkpoint).
    Returns the folder."""
    from safetensors.torch import save_file

    from .api import ReMatch
    from .model.quant import check_preset

    if check_preset(preset) == "bf16":
        raise InputError("preset 'bf16' keeps the weights as they are: there is nothing to write")
    out = Path(out)
    check_replaceable(out, QUANTIZED_MANIFEST, overwrite, "a pre-quantized checkpoint")
    model = ReMatch.from_pretrained(checkpoint, backend="fast", kernels="torch", dtype=dtype, quantize=preset)
    source = model.checkpoint
    if source.quantized:
        raise InputError(f"{source.path} is already pre-quantized ({source.quantized})")
    state = {k: v.contiguous() for k, v in model.backend.model.state_dict().items()}
    with staged_folder(out, QUANTIZED_MANIFEST, overwrite, "a pre-quantized checkpoint") as staging:
        for f in source.path.iterdir():  # everything but the weights, as it is
            if f.is_file() and not (f.name.startswith("model") and f.name.endswith((".safetensors", ".json"))):
                shutil.copy2(f, staging / f.name)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt", "rematch_fast": preset})
        manifest = {"format_version": FORMAT_VERSION, "preset": preset, "dtype": str(dtype).removeprefix("torch."),
                    "source": {"checkpoint": str(source.path.resolve()), "fingerprint": source.fingerprint}}
        (staging / QUANTIZED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
