"""Items -> model input sequences (backend-independent).

A `Sequence` is one model input: token ids, M-RoPE positions, the pixel
patches of its images, and "soft" rows whose input embeddings are given
directly (the K learnable tokens, or a feature view Z*). Backends turn
sequences into hidden states; they never look at templates or items.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .checkpoint import SpecialTokens
from .config import ReMatchConfig, check_side
from .errors import ConfigError, ImageError, TruncationWarning
from .images import ImageProcessor
from .items import Item
from .tokenizer import Tokenizers


@dataclass
class PreparedItem:
    """An item tokenized and its image cut into patches, before any template."""

    text_ids: list[int]
    pixel_values: torch.Tensor | None  # [P, 3*T*p*p]
    grid_thw: tuple[int, int, int] | None
    truncated: bool = False


@dataclass
class Sequence:
    input_ids: torch.Tensor  # [L] int64; soft rows hold a placeholder id
    positions: torch.Tensor  # [3, L] int64 M-RoPE (t, h, w)
    pixel_values: torch.Tensor | None  # [P, 3*T*p*p] for all images, in order
    grid_thw: torch.Tensor  # [n_images, 3] int64
    soft_positions: torch.Tensor  # [S] int64
    soft_embeds: torch.Tensor | None  # [S, d]
    readout: torch.Tensor  # [R] int64: positions whose last hidden states are read
    # leading tokens that every sequence of its kind repeats (the embed template before the item):
    # plain template text, which a backend may compute once and share (see `tail`)
    shared_prefix: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def head(self) -> Sequence:
        """The shared template prefix alone (text only, nothing read out): what a backend prefills."""
        n = self.shared_prefix
        return Sequence(self.input_ids[:n], self.positions[:, :n], None, self.grid_thw[:0],
                        self.soft_positions[:0], None, self.readout[:0])

    def tail(self) -> Sequence:
        """The sequence after its shared template prefix, positions kept: what continues `head()`
        (the prefix holds no image and no soft row)."""
        n = self.shared_prefix
        if len(self.soft_positions) and int(self.soft_positions.min()) < n:
            raise ValueError(f"the first {n} tokens are not a shared template prefix of this sequence")
        return Sequence(self.input_ids[n:], self.positions[:, n:], self.pixel_values, self.grid_thw,
                        self.soft_positions - n, self.soft_embeds, self.readout - n, 0)


class _Builder:
    """Appends text, image blocks and soft rows, tracking M-RoPE positions."""

    def __init__(self, merge_size: int, next_pos: int = 0):
        self.merge = merge_size
        self.ids: list[int] = []
        self.pos: list[torch.Tensor] = []
        self.next_pos = next_pos  # M-RoPE position of the next token (a suffix continues its prefix's)
        self.pixels: list[torch.Tensor] = []
        self.grids: list[tuple[int, int, int]] = []
        self.soft_pos: list[int] = []
        self.soft: list[torch.Tensor] = []

    def text(self, ids: list[int]) -> None:
        n = len(ids)
        self.ids += ids
        self.pos.append(torch.arange(self.next_pos, self.next_pos + n).expand(3, n))
        self.next_pos += n

    def image(self, pixel_values, grid, pad_id: int) -> None:
        t, h, w = grid
        gh, gw = h // self.merge, w // self.merge
        self.ids += [pad_id] * (t * gh * gw)
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        self.pos.append(torch.stack([tt, hh, ww]).reshape(3, -1) + self.next_pos)
        self.next_pos += max(t, gh, gw)
        self.pixels.append(pixel_values)
        self.grids.append(grid)

    def soft_rows(self, embeds: torch.Tensor, placeholder_id: int) -> None:  # embeds [n, d]
        start = len(self.ids)
        self.soft_pos += range(start, start + embeds.shape[0])
        self.soft.append(embeds)
        self.text([placeholder_id] * embeds.shape[0])

    def build(self, readout: list[int]) -> Sequence:
        return Sequence(
            input_ids=torch.tensor(self.ids, dtype=torch.long),
            positions=torch.cat(self.pos, dim=1).long(),
            pixel_values=torch.cat(self.pixels) if self.pixels else None,
            grid_thw=torch.tensor(self.grids, dtype=torch.long).reshape(-1, 3),
            soft_positions=torch.tensor(self.soft_pos, dtype=torch.long),
            soft_embeds=torch.cat(self.soft) if self.soft else None,
            readout=torch.tensor(readout, dtype=torch.long),
        )


class Preprocessor:
    def __init__(self, config: ReMatchConfig, tokenizers: Tokenizers, image_processor: ImageProcessor,
                 special: SpecialTokens):
        self.config = config
        self.tok = tokenizers
        self.images = image_processor
        self.pad_id = special.pad
        self.image_pad_id = special.image
        self.vision_start_id = special.vision_start
        self.vision_end_id = special.vision_end
        self.answer_ids = (self._single_token(config.answer_yes), self._single_token(config.answer_no))
        # templates split once around their fields
        self._embed_parts = {}
        for side in ("query", "document"):
            filled = config.embed_template.replace("{instruction}", config.instruction(side))
            before, after = filled.split("{item}")
            self._embed_parts[side] = (tokenizers.encode_template(before), tokenizers.encode_template(after))
        t = config.match_template
        first, second = ("{query}", "{document}") if config.query_first else ("{document}", "{query}")
        a, rest = t.split(first)
        b, c = rest.split(second)
        self._match_parts = tuple(tokenizers.encode_template(s) for s in (a, b, c))

    def _single_token(self, answer: str) -> int:
        ids = self.tok.encode_text(answer)
        if len(ids) != 1:
            raise ConfigError(f"answer {answer!r} must be one token, the tokenizer gives {len(ids)}")
        return ids[0]

    # -- items --------------------------------------------------------------
    @staticmethod
    def text_of(item: Item) -> str:
        # stripped: edge whitespace carries no meaning and would merge with the template's newlines
        return item.text.strip() if item.text else ""

    def prepare(self, item: Item, text_ids: list[int] | None = None) -> PreparedItem:
        """Tokenize (unless `text_ids` are given, from a batched tokenization) and load the image."""
        ids = self.tok.encode_text(self.text_of(item)) if text_ids is None else text_ids
        truncated = len(ids) > self.config.max_text_tokens
        if truncated:
            warnings.warn(
                f"text of {len(ids)} tokens cut to max_text_tokens={self.config.max_text_tokens}",
                TruncationWarning,
                stacklevel=3,
            )
            ids = ids[: self.config.max_text_tokens]
        pixels = grid = None
        if item.image is not None:
            pixels, grid = self.images(self.images.load(item.image))
            if grid[0] * grid[1] * grid[2] == 0:
                raise ImageError("image produced no patches")
        return PreparedItem(ids, pixels, grid, truncated)

    def embed_length(self, p: PreparedItem, side: str) -> int:
        """Tokens of the embedding sequence of `p` (without building it): what batching budgets."""
        before, after = self._embed_parts[side]
        image = 0
        if p.grid_thw is not None:
            t, h, w = p.grid_thw
            image = 2 + t * h * w // self.images.merge_size**2
        return len(before) + len(after) + len(p.text_ids) + image + self.config.num_learnable_tokens

    def _item(self, b: _Builder, p: PreparedItem) -> None:
        # image first, then text (Qwen2-VL's own order for a user turn)
        if p.pixel_values is not None:
            b.text([self.vision_start_id])
            b.image(p.pixel_values, p.grid_thw, self.image_pad_id)
            b.text([self.vision_end_id])
        b.text(p.text_ids)

    # -- sequences ----------------------------------------------------------
    def embed_sequence(self, p: PreparedItem, side: str, learnable: torch.Tensor) -> Sequence:
        """Template, item, then the side's K learnable tokens as the last K rows (read out)."""
        check_side(side)
        before, after = self._embed_parts[side]
        b = _Builder(self.images.merge_size)
        b.text(before)
        self._item(b, p)
        b.text(after)
        b.soft_rows(learnable, self.pad_id)
        n = len(b.ids)
        seq = b.build(readout=list(range(n - learnable.shape[0], n)))
        seq.shared_prefix = len(before)
        return seq

    def match_sequence(self, query: PreparedItem | torch.Tensor, document: PreparedItem | torch.Tensor) -> Sequence:
        """The matching prompt; a tensor [d] stands for a feature view Z* (one soft row)."""
        b = _Builder(self.images.merge_size)
        a, mid, end = self._match_parts
        first, second = (query, document) if self.config.query_first else (document, query)
        b.text(a)
        self._side(b, first)
        b.text(mid)
        self._side(b, second)
        b.text(end)
        return b.build(readout=[len(b.ids) - 1])

    def match_prefix(self, query: PreparedItem | torch.Tensor) -> tuple[Sequence, int]:
        """The part of a query-first matching prompt shared by every candidate: the template up to
        the document, with the query view. Returns it and the M-RoPE position its suffixes start at."""
        if not self.config.query_first:
            raise ConfigError("match_template shows the document first: there is no shared query prefix")
        b = _Builder(self.images.merge_size)
        a, mid, _ = self._match_parts
        b.text(a)
        self._side(b, query)
        b.text(mid)
        return b.build(readout=[]), b.next_pos

    def match_suffix(self, document: PreparedItem | torch.Tensor, next_pos: int) -> Sequence:
        """One candidate's part of the prompt after the shared prefix: the document view and the
        assistant header, with the M-RoPE positions it has in the full sequence (from `next_pos`),
        read out at its end. Its soft rows and readout are numbered within the suffix."""
        b = _Builder(self.images.merge_size, next_pos)
        self._side(b, document)
        b.text(self._match_parts[2])
        return b.build(readout=[len(b.ids) - 1])

    def _side(self, b: _Builder, x: PreparedItem | torch.Tensor) -> None:
        if isinstance(x, torch.Tensor):
            b.soft_rows(x.reshape(1, -1), self.pad_id)
        else:
            self._item(b, x)
