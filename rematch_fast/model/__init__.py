"""rematch_fast's own compact Qwen2-VL / Qwen2.5-VL: one small file per part, packed
(variable-length) batches, weights read straight from the checkpoint's safetensors."""
from .config import ModelConfig
from .loader import load_model

__all__ = ["ModelConfig", "load_model"]
