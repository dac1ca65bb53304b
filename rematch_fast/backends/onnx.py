"""backend="onnx": an export folder (rematch-fast export onnx) run by ONNX Runtime.

Sequences are prepared exactly as for the torch backends. A batch's images go through
`vision.onnx` in one call; the batch is right-padded and given to `embed.onnx` or `match.onnx`
with its rotary tables and soft rows, the image features among them (see
rematch_fast.export.onnx). Runs on the CPU; on CUDA only when ONNX Runtime really creates its
CUDA provider (checked on the session, never assumed).
"""
from __future__ import annotations

import json

import numpy as np
import torch

from ..checkpoint import EXPORT_MANIFEST, Checkpoint
from ..errors import CheckpointError, MissingPackageError
from ..embeddings import Embeddings
from ..export.onnx import FORMAT_VERSION, GRAPHS, dense_inputs, image_batch, vision_inputs
from ..model.config import model_config
from ..model.decoder import inverse_frequencies
from ..model.vision import vision_inverse_frequencies
from ..sequence import Sequence
from .base import INPUT_KINDS


class OnnxBackend:
    name = "onnx"
    padded = True  # a batch costs count x longest
    longest_first = True
    inputs = frozenset(INPUT_KINDS)

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingPackageError("backend 'onnx' needs onnxruntime: pip install 'rematch_fast[onnx]'") from None
        manifest = json.loads((ckpt.path / EXPORT_MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{ckpt.path / EXPORT_MANIFEST}: format_version {manifest.get('format_version')!r}, "
                                  f"this release reads {FORMAT_VERSION}: export the checkpoint again")
        if manifest.get("precision") not in ("fp32", "int8"):
            raise CheckpointError(f"{ckpt.path}: precision {manifest.get('precision')!r} is not one this release runs")
        if dtype != torch.float32:
            raise CheckpointError(f"the export's inputs and outputs are float32 (its graphs run in "
                                  f"{manifest.get('precision')}): open it with dtype=torch.float32")
        wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
        self.sessions = {}
        for name, spec in GRAPHS.items():
            path = ckpt.path / spec.file
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: the export is incomplete, export the checkpoint again")
            session = ort.InferenceSession(str(path), providers=wanted + ["CPUExecutionProvider"])
            if wanted and wanted[0] not in session.get_providers():
                raise CheckpointError(f"ONNX Runtime did not create its CUDA provider here ({session.get_providers()}); "
                                      "install onnxruntime-gpu, or open the export with device='cpu'")
            self.sessions[name] = session
        self.answer_ids = tuple(manifest["answer_ids"])
        cfg = model_config(ckpt)
        self.inv_freq, self.mrope_section = inverse_frequencies(cfg.text), cfg.text.mrope_section
        self.vision_cfg, self.vision_inv_freq = cfg.vision, vision_inverse_frequencies(cfg.vision)
        self.dim, self.pad_id, self.device = cfg.text.hidden_size, ckpt.special_tokens.pad, device
        self.image_token_id = ckpt.special_tokens.image

    def _run(self, graph: str, seqs: list[Sequence]) -> list[np.ndarray]:
        features = None
        images = image_batch(seqs)
        if images is not None:  # every image of the batch in one vision call
            feed = vision_inputs(*images, self.vision_cfg, self.vision_inv_freq)
            features = torch.from_numpy(self.sessions["vision"].run(None, feed)[0])
        feed = dense_inputs(seqs, graph, self.pad_id, self.dim, self.inv_freq, self.mrope_section,
                            self.image_token_id, features)
        return self.sessions[graph].run(None, feed)

    def pooled(self, seqs: list[Sequence]) -> Embeddings:
        unit, norm = self._run("embed", seqs)
        return Embeddings(torch.from_numpy(unit).to(self.device), torch.from_numpy(norm).to(self.device))

    def answer_logits(self, seqs: list[Sequence], answer_ids: tuple[int, int]) -> torch.Tensor:
        if tuple(answer_ids) != self.answer_ids:
            raise CheckpointError(f"the export reads answers {self.answer_ids}, asked for {tuple(answer_ids)}")
        (logits,) = self._run("match", seqs)
        return torch.from_numpy(logits).to(self.device)
