"""What the backends that run exported graphs share ("onnx", "tensorrt"): reading the export's
manifest, the host-side inputs of each graph and the order graphs run in.

Sequences are prepared exactly as for the torch backends. A batch's images go through the
vision graph in one call; the batch is right-padded and given to the embed or match graph with
its rotary tables and soft rows, the image features among them (see
rematch_fast.export.onnx). Shared-prefix matching: the prefill graph computes a query's prefix
keys and values once, and the match_prefix graph runs each batch of candidates continuing it
(the API uses it as it uses the fast backend's). A subclass only runs one graph on a feed.
"""
from __future__ import annotations

import abc
import json

import numpy as np
import torch

from ..checkpoint import EXPORT_MANIFEST, Checkpoint
from ..embeddings import Embeddings
from ..errors import CheckpointError
from ..export.onnx import FORMAT_VERSION, GRAPHS, dense_inputs, image_batch, vision_inputs
from ..model.config import model_config
from ..model.decoder import inverse_frequencies
from ..model.vision import vision_inverse_frequencies
from ..sequence import Sequence
from .base import INPUT_KINDS

REQUIRED_GRAPHS = ("vision", "embed", "match")  # prefill and match_prefix come with query-first templates


class GraphBackend(abc.ABC):
    padded = True  # a batch costs count x longest
    longest_first = True
    inputs = frozenset(INPUT_KINDS)

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
        manifest = json.loads((ckpt.path / EXPORT_MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{ckpt.path / EXPORT_MANIFEST}: format_version {manifest.get('format_version')!r}, "
                                  f"this release reads {FORMAT_VERSION}: export the checkpoint again")
        if manifest.get("precision") not in ("fp32", "fp16", "int8"):
            raise CheckpointError(f"{ckpt.path}: precision {manifest.get('precision')!r} is not one this release runs")
        if dtype != torch.float32:
            raise CheckpointError(f"the export's inputs and outputs are float32 (its graphs run in "
                                  f"{manifest.get('precision')}): open it with dtype=torch.float32")
        listed = manifest.get("graphs", {})
        missing = [n for n in REQUIRED_GRAPHS if n not in listed]
        if missing:
            raise CheckpointError(f"{ckpt.path / EXPORT_MANIFEST} lists no graph {missing}: export the checkpoint again")
        self.manifest, self.graphs = manifest, [n for n in GRAPHS if n in listed]
        for name in self.graphs:
            if not (ckpt.path / GRAPHS[name].file).is_file():
                raise CheckpointError(f"{ckpt.path / GRAPHS[name].file} is missing: the export is incomplete, "
                                      "export the checkpoint again")
        self.answer_ids = tuple(manifest["answer_ids"])
        cfg = model_config(ckpt)
        self.inv_freq, self.mrope_section = inverse_frequencies(cfg.text), cfg.text.mrope_section
        self.vision_cfg, self.vision_inv_freq = cfg.vision, vision_inverse_frequencies(cfg.vision)
        self.dim, self.pad_id, self.device = cfg.text.hidden_size, ckpt.special_tokens.pad, device
        self.image_token_id = ckpt.special_tokens.image

    @abc.abstractmethod
    def _execute(self, graph: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one graph on its inputs; its outputs in GRAPHS order (each runtime's own)."""

    def _run(self, graph: str, seqs: list[Sequence], **extra: np.ndarray) -> list[np.ndarray]:
        features = None
        images = image_batch(seqs)
        if images is not None:  # every image of the batch in one vision call
            feed = vision_inputs(*images, self.vision_cfg, self.vision_inv_freq)
            features = torch.from_numpy(self._execute("vision", feed)[0])
        feed = dense_inputs(seqs, graph, self.pad_id, self.dim, self.inv_freq, self.mrope_section,
                            self.image_token_id, features)
        return self._execute(graph, {**feed, **extra})

    def pooled(self, seqs: list[Sequence]) -> Embeddings:
        unit, norm = self._run("embed", seqs)
        return Embeddings(torch.from_numpy(unit).to(self.device), torch.from_numpy(norm).to(self.device))

    def prefill(self, prefix: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """A shared prefix's keys and values, every layer: [layers, kv_heads, P, head_dim] each."""
        if "prefill" not in self.graphs:
            raise CheckpointError("this export has no prefix graphs (its template shows the document first)")
        keys, values = self._run("prefill", [prefix])
        return keys[:, 0], values[:, 0]

    def answer_logits(self, seqs: list[Sequence], answer_ids: tuple[int, int], prefix=None) -> torch.Tensor:
        """As the fast backend's: with `prefix` (a prefill state, or one per sequence), each
        sequence continues it; a batch of several prefixes runs prefix by prefix."""
        if tuple(answer_ids) != self.answer_ids:
            raise CheckpointError(f"the export reads answers {self.answer_ids}, asked for {tuple(answer_ids)}")
        if prefix is None:
            (logits,) = self._run("match", seqs)
            return torch.from_numpy(logits).to(self.device)
        prefixes = prefix if isinstance(prefix, list) else [prefix] * len(seqs)
        groups: dict[int, list[int]] = {}  # prefix (by identity) -> its sequences
        for i, p in enumerate(prefixes):
            groups.setdefault(id(p), []).append(i)
        logits = torch.empty(len(seqs), 2, dtype=torch.float32)
        for members in groups.values():
            keys, values = prefixes[members[0]]
            (part,) = self._run("match_prefix", [seqs[i] for i in members], prefix_keys=keys, prefix_values=values)
            logits[members] = torch.from_numpy(part)
        return logits.to(self.device)
