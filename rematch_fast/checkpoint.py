"""The checkpoint folder: a Hugging Face Qwen2-VL / Qwen2.5-VL folder plus
`rematch_config.json` and `rematch_head.safetensors` (docs/checkpoint.md).

Everything is read with json and safetensors only: no pickle, no remote code.
The model's constants come from the checkpoint's own files, read here and
nowhere else: shapes from config.json, image settings from
preprocessor_config.json (rematch_config.json may narrow the pixel bounds),
special token ids from config.json checked against tokenizer.json.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ARCHES, ARCHITECTURES, ReMatchConfig  # noqa: F401 - ARCHES re-exported
from .errors import CheckpointError, ConfigError
from .head import ReMatchHead
from .tokenizer import Tokenizers

REMATCH_CONFIG = "rematch_config.json"
REMATCH_HEAD = "rematch_head.safetensors"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
EXPORT_MANIFEST = "export.json"  # what marks an export folder (rematch_fast.export)
EXPORT_BACKENDS = ("onnx", "tensorrt")  # the backends that run export folders
QUANTIZED_MANIFEST = "quantization.json"  # what marks a pre-quantized checkpoint (rematch-fast quantize)
_SAMPLE = 1 << 20  # bytes of a weight file read at each of three places for the fingerprint
# our architecture name -> transformers' model and config classes
TRANSFORMERS_CLASSES = {
    "qwen2-vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLConfig"),
    "qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"),
}


def transformers_classes(arch: str) -> tuple[type, type]:
    """(model class, config class) of transformers for one of ARCHES (imported on first use)."""
    import transformers

    model, config = TRANSFORMERS_CLASSES[arch]
    return getattr(transformers, model), getattr(transformers, config)


@dataclass(frozen=True)
class ImageSettings:
    """How images become patches: from preprocessor_config.json, bounds narrowed by rematch_config.json."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]


@dataclass(frozen=True)
class SpecialTokens:
    image: int  # <|image_pad|>: one per merged image patch
    vision_start: int
    vision_end: int
    pad: int  # <|endoftext|>: placeholder under soft rows and static-shape padding


def text_config_of(model_config: dict) -> dict:
    """The decoder's part of config.json: transformers 5 nests it under text_config; older
    files keep it at the top level. The one place that unwraps it."""
    return model_config.get("text_config") or model_config


def tie_word_embeddings_of(model_config: dict) -> bool:
    """Whether the LM head is the embedding matrix: set at the top level, or in the text part."""
    top = model_config.get("tie_word_embeddings")
    return bool(top if top is not None else text_config_of(model_config).get("tie_word_embeddings", False))


@dataclass
class Checkpoint:
    path: Path
    arch: str  # "qwen2-vl" or "qwen2.5-vl"
    model_config: dict  # config.json as read
    config: ReMatchConfig
    preprocessor_config: dict  # preprocessor_config.json as read

    @property
    def text_config(self) -> dict:
        return text_config_of(self.model_config)

    @property
    def vision_config(self) -> dict:
        v = self.model_config.get("vision_config")
        if not isinstance(v, dict):
            raise CheckpointError(f"{self.path}/config.json has no vision_config")
        return v

    @property
    def tie_word_embeddings(self) -> bool:
        return tie_word_embeddings_of(self.model_config)

    @functools.cached_property
    def tokenizers(self) -> Tokenizers:
        return Tokenizers(self.path / "tokenizer.json")

    @functools.cached_property
    def special_tokens(self) -> SpecialTokens:
        """Ids from config.json where it names them, each checked against the tokenizer's."""
        def token(key: str, text: str) -> int:
            from_tokenizer = self.tokenizers.special_id(text)
            from_config = self.model_config.get(key, from_tokenizer)
            if from_config != from_tokenizer:
                raise CheckpointError(f"{self.path}: config.json says {key}={from_config} but tokenizer.json "
                                      f"gives {text} the id {from_tokenizer}; the two files disagree")
            return from_config

        return SpecialTokens(image=token("image_token_id", "<|image_pad|>"),
                             vision_start=token("vision_start_token_id", "<|vision_start|>"),
                             vision_end=token("vision_end_token_id", "<|vision_end|>"),
                             pad=self.tokenizers.special_id("<|endoftext|>"))

    @functools.cached_property
    def quantized(self) -> str | None:
        """The preset of a pre-quantized checkpoint (rematch-fast quantize), else None."""
        path = self.path / QUANTIZED_MANIFEST
        if not path.is_file():
            return None
        manifest = _read_json(path)
        if manifest.get("format_version") != 1:
            raise CheckpointError(f"{path}: format_version {manifest.get('format_version')!r}, this release reads 1: "
                                  "quantize the checkpoint again")
        preset = manifest.get("preset")
        if not isinstance(preset, str):
            raise CheckpointError(f"{path} names no preset: quantize the checkpoint again")
        return preset

    @property
    def exported(self) -> bool:
        """An export folder (rematch_fast.export): graphs and host-side files, no torch weights."""
        return (self.path / EXPORT_MANIFEST).is_file()

    @functools.cached_property
    def fingerprint(self) -> str:
        """A content fingerprint recorded in every index built with this checkpoint, so that a
        search never mixes checkpoints: the config, tokenizer and head files in full, and each
        weight file's size, header and three sampled blocks (hashing gigabytes in full would
        take seconds on every run; any re-save or retrain changes the sampled bytes). An export
        folder carries its source checkpoint's, so its indexes and the source's agree."""
        if self.exported:
            source = _read_json(self.path / EXPORT_MANIFEST).get("source")
            if not isinstance(source, dict) or not isinstance(source.get("fingerprint"), str):
                raise CheckpointError(f"{self.path / EXPORT_MANIFEST} does not name its source's fingerprint")
            return source["fingerprint"]
        digest = hashlib.sha256()
        for name in ("config.json", REMATCH_CONFIG, PREPROCESSOR_CONFIG, "tokenizer.json", REMATCH_HEAD):
            digest.update(name.encode() + b"\0" + (self.path / name).read_bytes())
        for f in sorted(self.path.glob("model*.safetensors")):
            size = f.stat().st_size
            digest.update(f"{f.name}\0{size}".encode())
            with f.open("rb") as fh:
                for at in (0, size // 2, max(0, size - _SAMPLE)):
                    fh.seek(at)
                    digest.update(fh.read(_SAMPLE))
        return "sha256:" + digest.hexdigest()

    @functools.cached_property
    def image_settings(self) -> ImageSettings:
        return image_settings(self.preprocessor_config, self.vision_config, self.config, self.path)

    def load_head(self, device="cpu", dtype=torch.float32) -> ReMatchHead:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        head = ReMatchHead(self.config)
        try:
            state = load_file(str(self.path / REMATCH_HEAD))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.path / REMATCH_HEAD} cannot be read: {e}") from None
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if expected != found:
            missing = sorted(set(expected) - set(found))
            extra = sorted(set(found) - set(expected))
            wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
            raise CheckpointError(
                f"{REMATCH_HEAD} does not match {REMATCH_CONFIG}: missing {missing}, unexpected {extra}, "
                + ", ".join(f"{k} has shape {found[k]} but {expected[k]} is needed" for k in wrong)
            )
        head.load_state_dict(state)
        return head.to(device=device, dtype=dtype).eval()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Check that `path` is a complete ReMatch checkpoint and read its configs."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    config_json = path / "config.json"
    if not config_json.is_file():
        raise CheckpointError(f"{path} is not a Hugging Face model folder: config.json is missing")
    model_config = _read_json(config_json)
    model_type = model_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{path} holds a {model_type!r} model; rematch_fast serves {sorted(ARCHITECTURES)} (Qwen2-VL, Qwen2.5-VL)"
        )
    exported = (path / EXPORT_MANIFEST).is_file()
    if not exported and not list(path.glob("model*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickled}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"{path} has no model*.safetensors weights{hint}")
    for name in (REMATCH_CONFIG, REMATCH_HEAD, "tokenizer.json", PREPROCESSOR_CONFIG):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a ReMatch checkpoint: {name} is missing")
    try:
        config = ReMatchConfig.load(path / REMATCH_CONFIG)
    except ConfigError as e:
        raise ConfigError(f"{path / REMATCH_CONFIG}: {e}") from None
    preprocessor = _read_json(path / PREPROCESSOR_CONFIG)
    ckpt = Checkpoint(path=path, arch=ARCHITECTURES[model_type], model_config=model_config, config=config,
                      preprocessor_config=preprocessor)
    if ckpt.text_config.get("hidden_size") != config.hidden_size:
        raise CheckpointError(
            f"{REMATCH_CONFIG} says hidden_size {config.hidden_size} but the model's is "
            f"{ckpt.text_config.get('hidden_size')}"
        )
    ckpt.image_settings  # noqa: B018 - checked now, so that a bad file fails at open, not at the first image
    if not exported:  # an export's backend checks its own graphs
        check_model_files(ckpt)
    return ckpt


def check_backend_fits(ckpt: Checkpoint, backend: str) -> None:
    """An export folder runs only on the export backends, a checkpoint only on the others."""
    if ckpt.exported and backend not in EXPORT_BACKENDS:
        raise CheckpointError(f"{ckpt.path} is an export folder ({EXPORT_MANIFEST}) without torch weights: open it "
                              f"with backend={EXPORT_BACKENDS[0]!r}, or open the checkpoint it was exported from")
    if not ckpt.exported and backend in EXPORT_BACKENDS:
        raise CheckpointError(f"backend {backend!r} runs an export folder; {ckpt.path} is a checkpoint: "
                              f"run `rematch-fast export onnx {ckpt.path} --out DIR` and open DIR")
    if ckpt.quantized and backend != "fast":
        raise CheckpointError(f"{ckpt.path} is pre-quantized ({ckpt.quantized}, {QUANTIZED_MANIFEST}): it runs on "
                              f"backend='fast'; open the checkpoint it was quantized from for backend={backend!r}")


def check_model_files(ckpt: Checkpoint) -> None:
    """config.json gives a complete model, and the safetensors files hold every tensor it implies
    with the right shape (headers only: fast). Both backends rely on it: transformers would
    otherwise fill missing layers with random weights, silently."""
    from .model.config import model_config
    from .model.loader import check_weights

    try:
        cfg = model_config(ckpt)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}/config.json does not describe a complete {ckpt.arch} model: "
                              f"{type(e).__name__} {e}") from None
    check_weights(ckpt.path, cfg, ckpt.quantized)


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON text: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return d


def image_settings(pre: dict, vision: dict, config: ReMatchConfig, where: Path | str = "") -> ImageSettings:
    """Image settings from preprocessor_config.json (both its layouts: top-level min_pixels /
    max_pixels, or size.shortest_edge / longest_edge); rematch_config.json may narrow the bounds."""
    size = pre.get("size") or {}
    lo = pre.get("min_pixels", size.get("min_pixels", size.get("shortest_edge")))
    hi = pre.get("max_pixels", size.get("max_pixels", size.get("longest_edge")))
    name = f"{where}/{PREPROCESSOR_CONFIG}" if where else PREPROCESSOR_CONFIG
    if not isinstance(lo, int) or not isinstance(hi, int) or not 0 < lo <= hi:
        raise CheckpointError(f"{name} needs pixel bounds min_pixels <= max_pixels (or size.shortest_edge / "
                              f"size.longest_edge), got {lo!r} and {hi!r}")
    if config.min_pixels is not None:
        lo = max(lo, config.min_pixels)
    if config.max_pixels is not None:
        hi = min(hi, config.max_pixels)
    if lo > hi:
        raise CheckpointError(f"{REMATCH_CONFIG}'s pixel bounds [{config.min_pixels}, {config.max_pixels}] leave "
                              f"nothing of {name}'s; they may only narrow them")
    shapes = {}
    for ours, theirs in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                         ("merge_size", "spatial_merge_size")):
        value = pre.get(ours, vision.get(theirs))
        if not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{name} (or config.json's vision_config) needs a positive integer {ours}, got {value!r}")
        if theirs in vision and vision[theirs] != value:
            raise CheckpointError(f"{name} says {ours}={value} but config.json's vision_config says "
                                  f"{theirs}={vision[theirs]}; the image patches would not fit the model")
        shapes[ours] = value
    mean, std = tuple(pre.get("image_mean", ())), tuple(pre.get("image_std", ()))
    if len(mean) != 3 or len(std) != 3 or not all(std):
        raise CheckpointError(f"{name} needs image_mean and image_std with three values each (std non-zero)")
    return ImageSettings(min_pixels=lo, max_pixels=hi, image_mean=mean, image_std=std, **shapes)


def save_head(head: ReMatchHead, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(Path(path) / REMATCH_HEAD), metadata={"format": "pt"})
