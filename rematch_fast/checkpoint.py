"""The checkpoint folder: a Hugging Face Qwen2-VL / Qwen2.5-VL folder plus
`rematch_config.json` and `rematch_head.safetensors` (REMATCH.md).

Everything is read with json and safetensors only: no pickle, no remote code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ReMatchConfig
from .errors import CheckpointError, ConfigError
from .head import ReMatchHead

REMATCH_CONFIG = "rematch_config.json"
REMATCH_HEAD = "rematch_head.safetensors"
# config.json's model_type -> our architecture name
ARCHITECTURES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl"}


@dataclass
class Checkpoint:
    path: Path
    arch: str  # "qwen2-vl" or "qwen2.5-vl"
    model_config: dict  # config.json as read
    config: ReMatchConfig

    @property
    def text_config(self) -> dict:
        # transformers 5 nests it under text_config; older checkpoints keep it at the top level
        return self.model_config.get("text_config") or self.model_config

    @property
    def vision_config(self) -> dict:
        return self.model_config["vision_config"]

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
    try:
        model_config = json.loads(config_json.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_json} is not valid JSON: {e}") from None
    model_type = model_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{path} holds a {model_type!r} model; rematch_fast serves {sorted(ARCHITECTURES)} (Qwen2-VL, Qwen2.5-VL)"
        )
    if not list(path.glob("model*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickled}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"{path} has no model*.safetensors weights{hint}")
    for name in (REMATCH_CONFIG, REMATCH_HEAD, "tokenizer.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a ReMatch checkpoint: {name} is missing")
    try:
        config = ReMatchConfig.load(path / REMATCH_CONFIG)
    except ConfigError as e:
        raise ConfigError(f"{path / REMATCH_CONFIG}: {e}") from None
    ckpt = Checkpoint(path=path, arch=ARCHITECTURES[model_type], model_config=model_config, config=config)
    if ckpt.text_config.get("hidden_size") != config.hidden_size:
        raise CheckpointError(
            f"{REMATCH_CONFIG} says hidden_size {config.hidden_size} but the model's is "
            f"{ckpt.text_config.get('hidden_size')}"
        )
    return ckpt


def save_head(head: ReMatchHead, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(Path(path) / REMATCH_HEAD), metadata={"format": "pt"})
