"""backend="onnx": an export folder (rematch-fast export onnx) run by ONNX Runtime.

The host side is GraphBackend's (rematch_fast.backends.graphs). Runs on the CPU; on CUDA only
when ONNX Runtime really creates its CUDA provider (checked on the session, never assumed).
"""
from __future__ import annotations

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..errors import CheckpointError, MissingPackageError
from ..export.onnx import GRAPHS
from .graphs import GraphBackend


class OnnxBackend(GraphBackend):
    name = "onnx"

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingPackageError("backend 'onnx' needs onnxruntime: pip install 'rematch_fast[onnx]'") from None
        super().__init__(ckpt, device, dtype)
        wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
        self.sessions = {}
        for name in self.graphs:
            session = ort.InferenceSession(str(ckpt.path / GRAPHS[name].file), providers=wanted + ["CPUExecutionProvider"])
            if wanted and wanted[0] not in session.get_providers():
                raise CheckpointError(f"ONNX Runtime did not create its CUDA provider here ({session.get_providers()}); "
                                      "install onnxruntime-gpu, or open the export with device='cpu'")
            self.sessions[name] = session

    def _execute(self, graph: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[graph].run(None, feed)
