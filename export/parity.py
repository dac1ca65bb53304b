"""Parity of an export against its reference model: the gate every export passes before it is
reported as good.

`compare(reference, candidate)` embeds one retrieval set with both models (by default a few
texts and synthetic images of odd sizes, so every graph of an export is exercised) and scores a
few matching pairs, then returns a `ParityReport`: per-row cosine (min, p1, mean) and max abs error
of the unit embeddings, top-10 overlap and rank correlation of the query x document scores,
and |delta p(yes)| on the pairs, with the thresholds of the export's precision. The report is
falsy when a threshold fails and when nothing was compared.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..items import Item, as_item

# per precision: what must hold (issue thresholds; fp32 is exact up to summation order)
THRESHOLDS = {
    "fp32": {"max_abs": 1e-4, "p_yes_max_abs": 1e-4},
    "fp16": {"cosine_min": 0.999, "top10_overlap": 0.95},
    "int8": {"cosine_min": 0.99, "top10_overlap": 0.9},
}
BUILTIN_TEXTS = [  # a small retrieval set when the user gives no corpus: varied words and lengths
    "a river at dawn", "fresh bread from the market", "the moon over the harbour", "seven blue engines",
    "quiet streets after the rain", "a photo of mountains in winter", "stock prices rose on monday",
    "a recipe for apple pie with cinnamon", "the old library and its reading room", "children playing football",
    "a long report on the history of trains in europe and the people who built them",
    "notes from a meeting about the new budget", "how to repair a bicycle tyre", "birds", "a quiet cafe",
    "the results of the election in the northern region", "an engine that runs on hydrogen",
    "a poem about the sea and the wind and the long grey evenings", "weather forecast for the weekend",
    "a map of the city centre", "instructions for the washing machine", "a red kite above the hills",
]
BUILTIN_IMAGE_SIZES = ((97, 61), (160, 120), (45, 230), (128, 128), (300, 90))  # (width, height)


def builtin_images() -> list:
    """Deterministic images for parity: colour gradients with a bright rectangle and noise, at
    odd sizes and aspect ratios; every second one captioned."""
    from PIL import Image

    rng = np.random.default_rng(20261126)
    items = []
    for i, (w, h) in enumerate(BUILTIN_IMAGE_SIZES):
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([x / w, y / h, 1 - (x + y) / (w + h)], axis=-1) * 180 + rng.integers(0, 60, (h, w, 3))
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        pixels[top: top + h // 3, left: left + w // 3] = rng.integers(150, 255, 3)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        items.append(Item(text=BUILTIN_TEXTS[i] if i % 2 else None, image=image))
    return items


@dataclass
class ParityReport:
    precision: str
    rows: int = 0  # embeddings compared (queries and documents)
    images: int = 0  # of the items embedded, those with an image
    cosine_min: float | None = None
    cosine_p1: float | None = None
    cosine_mean: float | None = None
    max_abs: float | None = None
    top10_overlap: float | None = None  # mean over queries of |top-10 ref & top-10 candidate| / 10
    rank_correlation: float | None = None  # mean Spearman correlation of each query's document scores
    p_yes_max_abs: float | None = None
    pairs: int = 0
    thresholds: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": bool(self)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        verdict = "PASSED" if self else "FAILED: " + "; ".join(self.failures)
        figures = ", ".join(f"{k} {v:.3g}" for k, v in [("cosine min", self.cosine_min), ("max abs", self.max_abs),
                                                        ("top-10 overlap", self.top10_overlap),
                                                        ("|dp(yes)| max", self.p_yes_max_abs)] if v is not None)
        counts = f"{self.rows} embeddings ({2 * self.images} of images), {self.pairs} pairs"
        return f"parity ({self.precision}, {counts}): {figures}. {verdict}"


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the rank correlation of a[i] and b[i] (ties broken by position)."""
    ra, rb = a.argsort(dim=1).argsort(dim=1).double(), b.argsort(dim=1).argsort(dim=1).double()
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    return float(((ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)).mean())


def compare(reference, candidate, items: list | None = None, precision: str = "fp32",
            match_pairs: int = 8) -> ParityReport:
    """Compare two ReMatch models on `items` (texts, dicts or Items; default: the built-in texts
    and images), each embedded as a query and as a document, and on the first item matched
    against up to `match_pairs` others."""
    if precision not in THRESHOLDS:
        raise ValueError(f"precision must be one of {sorted(THRESHOLDS)}, got {precision!r}")
    items = list(BUILTIN_TEXTS + builtin_images() if items is None else items)
    report = ParityReport(precision, thresholds=THRESHOLDS[precision])
    if len(items) < 2:
        report.failures.append(f"nothing to compare: {len(items)} items (at least 2 are needed)")
        return report
    report.images = sum(as_item(t).image is not None for t in items)
    ref = {s: reference.encode(items, side=s).unit.double() for s in ("query", "document")}
    cand = {s: candidate.encode(items, side=s).unit.double() for s in ("query", "document")}
    a, b = torch.cat([ref["query"], ref["document"]]), torch.cat([cand["query"], cand["document"]])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    report.rows = a.shape[0]
    report.cosine_min, report.cosine_mean = float(cos.min()), float(cos.mean())
    report.cosine_p1 = float(torch.quantile(cos, 0.01))
    report.max_abs = float((a - b).abs().max())
    s_ref, s_cand = ref["query"] @ ref["document"].T, cand["query"] @ cand["document"].T
    k = min(10, s_ref.shape[1])
    top_ref, top_cand = s_ref.topk(k, dim=1).indices, s_cand.topk(k, dim=1).indices
    report.top10_overlap = float(sum(len(set(x) & set(y)) for x, y in zip(top_ref.tolist(), top_cand.tolist()))
                                 / (k * len(items)))
    report.rank_correlation = _spearman(s_ref, s_cand)
    # the pairs: the first item against the next ones and the last ones (the built-in images)
    rest, half = items[1:], match_pairs // 2
    docs = rest if len(rest) <= match_pairs else rest[:match_pairs - half] + rest[-half:]
    p_ref, p_cand = reference.match(items[0], docs), candidate.match(items[0], docs)
    report.pairs = len(docs)
    report.p_yes_max_abs = float((p_ref - p_cand).abs().max())
    for name, bound in report.thresholds.items():
        value = getattr(report, name)
        ok = value <= bound if name.endswith("max_abs") else value >= bound
        if not ok:
            report.failures.append(f"{name} {value:.3g} {'>' if name.endswith('max_abs') else '<'} {bound}")
    return report
