"""ReMatchConfig: everything rematch_fast decides about the model lives here.

It is stored as `rematch_config.json` beside the Hugging Face files of a
checkpoint (docs/checkpoint.md); no code path hard-codes any of these values.
This module also holds the small tables every other module shares (sides,
views, dtype names).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import ConfigError, InputError

if TYPE_CHECKING:  # torch is imported where a dtype or device is parsed: the CLI starts without it
    import torch

FORMAT_VERSION = 1
# config.json's model_type -> our architecture name
ARCHITECTURES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl"}
ARCHES = tuple(ARCHITECTURES.values())
SIDES = ("query", "document")
VIEWS = ("raw", "feat")
# dtypes by their torch names; float64: the reference as an exact oracle for low-precision tests
MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")
# what the search kernel reads: float32/16, bfloat16, or a per-row quantized int8 or fp8 (e4m3) corpus
INDEX_DTYPES = ("float32", "float16", "bfloat16", "int8", "float8_e4m3fn")
# weight formats of the fast backend's linear layers (rematch_fast.model.quant)
QUANTIZE_PRESETS = ("bf16", "int8-weight", "fp8", "bnb-int8", "bnb-nf4")
# most sequences per forward pass (the token budget, 8192 by default, binds first for long inputs):
# matching's suffixes are short (a feat candidate is a few tokens), so it packs more of them
EMBED_BATCH_SIZE, MATCH_BATCH_SIZE = 64, 512
DEFAULT_SHARD_ROWS = 100_000  # rows per shard of an embedding store (rematch_fast.shards)
DEFAULT_DECODE_LIMIT = 16384 * 16384  # the largest image file decoded at all, in pixels (rematch_fast.images)

# The Qwen2 chat frame both templates use. `{instruction}` and `{item}` are
# filled per side for embedding; `{query}` and `{document}` for matching.
# Each field follows a newline and is followed by a special token, and item
# texts are stripped, so tokenizing the pieces apart gives the same ids as
# tokenizing the whole prompt at once (no BPE merge across a field's edge).
_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
DEFAULT_EMBED_TEMPLATE = _SYSTEM + "<|im_start|>user\n{instruction}{item}<|im_end|>\n<|im_start|>assistant\n"
DEFAULT_MATCH_TEMPLATE = (
    _SYSTEM + "<|im_start|>user\nIs the document relevant to the query? Answer only Yes or No.\n"
    "Query:\n{query}<|im_end|>\n<|im_start|>user\nDocument:\n{document}<|im_end|>\n<|im_start|>assistant\n"
)


@dataclass
class ProjectorConfig:
    """Z* = fc2(act(fc1(E*))): Linear(d, hidden_size) -> act -> Linear(hidden_size, d)."""

    hidden_size: int
    activation: str = "gelu"

    def validate(self) -> None:
        if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ConfigError(f"projector.hidden_size must be a positive integer, got {self.hidden_size!r}")
        if self.activation not in ("gelu", "gelu_tanh", "silu", "relu"):
            raise ConfigError(f"projector.activation {self.activation!r} is not one of gelu, gelu_tanh, silu, relu")


@dataclass
class ReMatchConfig:
    hidden_size: int  # d: the decoder's hidden size, also the embedding size
    num_learnable_tokens: int = 16  # K, per side
    fusion: str = "mean"
    normalize: bool = True
    projector: ProjectorConfig | None = None  # defaults to hidden_size -> hidden_size
    embed_template: str = DEFAULT_EMBED_TEMPLATE
    query_instruction: str = "Represent the query for retrieving relevant documents.\n"
    document_instruction: str = "Represent the document for retrieval.\n"
    match_template: str = DEFAULT_MATCH_TEMPLATE
    answer_yes: str = "Yes"
    answer_no: str = "No"
    # optional: narrow preprocessor_config.json's pixel bounds (never widen them)
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_text_tokens: int = 1024
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # unknown keys of a newer writer, kept on save

    def __post_init__(self):
        if self.projector is not None and not isinstance(self.projector, (dict, ProjectorConfig)):
            raise ConfigError(f"projector must be an object with hidden_size and activation, got {self.projector!r}")
        if isinstance(self.projector, dict):
            try:
                self.projector = ProjectorConfig(**self.projector)
            except TypeError as e:
                raise ConfigError(f"projector: {e}") from None
        if self.projector is None and isinstance(self.hidden_size, int):
            self.projector = ProjectorConfig(hidden_size=self.hidden_size)
        self.validate()

    # -- validation -------------------------------------------------------
    def validate(self) -> None:
        def positive_int(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")

        for name in ("hidden_size", "num_learnable_tokens", "max_text_tokens", "format_version"):
            positive_int(name)
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None:
                positive_int(name)
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"rematch_config.json has format_version {self.format_version}; this rematch_fast reads "
                f"up to {FORMAT_VERSION}: upgrade rematch_fast"
            )
        if self.fusion != "mean":
            raise ConfigError(f"fusion {self.fusion!r} is not supported (only 'mean')")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize must be true or false, got {self.normalize!r}")
        self.projector.validate()
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        _check_fields(self.embed_template, "embed_template", ("{instruction}", "{item}"))
        _check_fields(self.match_template, "match_template", ("{query}", "{document}"))
        for name in ("answer_yes", "answer_no", "query_instruction", "document_instruction"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string")
        if not self.answer_yes or not self.answer_no or self.answer_yes == self.answer_no:
            raise ConfigError("answer_yes and answer_no must be two different non-empty strings")

    # -- derived ----------------------------------------------------------
    @property
    def query_first(self) -> bool:
        """True when the matching template shows the query before the document (prefix sharing works)."""
        return self.match_template.index("{query}") < self.match_template.index("{document}")

    def instruction(self, side: str) -> str:
        check_side(side)
        return self.query_instruction if side == "query" else self.document_instruction

    # -- (de)serialization -------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_dict(cls, d: dict) -> ReMatchConfig:
        if not isinstance(d, dict):
            raise ConfigError("rematch_config.json must hold a JSON object")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "hidden_size" not in d:
            raise ConfigError("rematch_config.json lacks 'hidden_size'")
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ReMatchConfig:
        try:
            d = json.loads(Path(path).read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON text: {e}") from None
        return cls.from_dict(d)


def _check_fields(template: str, name: str, fields: tuple[str, ...]) -> None:
    if not isinstance(template, str):
        raise ConfigError(f"{name} must be a string")
    for f in fields:
        if template.count(f) != 1:
            raise ConfigError(f"{name} must contain {f} exactly once, found {template.count(f)}")


def parse_dtype(dtype: str | torch.dtype, names: tuple[str, ...], what: str = "dtype") -> torch.dtype:
    """A dtype given by name ("bfloat16") or as a torch.dtype, one of `names`."""
    import torch

    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in names or not isinstance(getattr(torch, name, None), torch.dtype):
        raise InputError(f"{what} must be one of {sorted(names)}, got {dtype!r}")
    return getattr(torch, name)


def available_devices() -> list[str]:
    """The devices this machine can run on, e.g. ["cpu", "cuda:0"]."""
    import torch

    acc = getattr(torch, "accelerator", None)  # torch >= 2.6; older: CUDA only
    if acc is not None and acc.is_available():
        kind = acc.current_accelerator().type
        return ["cpu"] + [f"{kind}:{i}" for i in range(acc.device_count())]
    if torch.cuda.is_available():
        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def parse_device(device) -> torch.device:
    """A torch device this machine has; otherwise an InputError listing those it has (torch itself
    would fail later, with a bare AssertionError or RuntimeError, when a tensor moves there)."""
    import torch

    here = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r} is not a torch device; available here: {', '.join(here)}") from None
    if dev.type == "cpu" or (f"{dev.type}:{dev.index}" in here if dev.index is not None
                             else any(d.startswith(dev.type + ":") for d in here)):
        return dev
    raise InputError(f"device {str(dev)!r} is not available on this machine; available here: {', '.join(here)}")


def check_side(side: str) -> None:
    if side not in SIDES:
        raise InputError(f"side must be one of {SIDES}, got {side!r}")


def check_view(view: str, name: str) -> None:
    if view not in VIEWS:
        raise InputError(f"{name} must be one of {VIEWS}, got {view!r}")
