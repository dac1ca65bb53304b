import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rematch_fast import CheckpointError, ConfigError, ReMatch
from rematch_fast.checkpoint import open_checkpoint
from rematch_fast.tiny import make_tiny_checkpoint


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes(tiny_paths, tmp_path):
    again = make_tiny_checkpoint(tmp_path / "again", arch="qwen2.5-vl", seed=0)
    assert _files(again) == _files(tiny_paths["qwen2.5-vl"])
    other = make_tiny_checkpoint(tmp_path / "other", arch="qwen2.5-vl", seed=1)
    a, b = _files(other), _files(again)
    assert a["model.safetensors"] != b["model.safetensors"]
    assert a["rematch_head.safetensors"] != b["rematch_head.safetensors"]


def test_tiny_architectures_are_the_real_ones(tiny_paths):
    c2 = json.loads((tiny_paths["qwen2-vl"] / "config.json").read_text())
    c25 = json.loads((tiny_paths["qwen2.5-vl"] / "config.json").read_text())
    assert c2["model_type"] == "qwen2_vl" and c25["model_type"] == "qwen2_5_vl"
    v = c25["vision_config"]
    assert v["fullatt_block_indexes"] and len(v["fullatt_block_indexes"]) < v["depth"]  # window blocks too
    assert v["window_size"] > 0


def test_size_overrides(tmp_path):
    p = make_tiny_checkpoint(tmp_path / "c", arch="qwen2-vl", hidden_size=32, num_hidden_layers=1,
                             num_learnable_tokens=4)
    m = ReMatch.from_pretrained(p)
    assert m.dim == 32 and m.config.num_learnable_tokens == 4
    assert m.embed(["x"]).shape == (1, 32)
    with pytest.raises(ValueError, match="unknown size overrides"):
        make_tiny_checkpoint(tmp_path / "d", arch="qwen2-vl", hiden_size=32)
    with pytest.raises(ValueError, match="arch"):
        make_tiny_checkpoint(tmp_path / "e", arch="llama")


def test_head_round_trip(models, tiny_paths):
    m = models["qwen2-vl"]
    stored = load_file(str(tiny_paths["qwen2-vl"] / "rematch_head.safetensors"))
    assert set(stored) == {"query_tokens", "doc_tokens", "projector.fc1.weight", "projector.fc1.bias",
                           "projector.fc2.weight", "projector.fc2.bias"}
    K, d = m.config.num_learnable_tokens, m.dim
    assert stored["query_tokens"].shape == (K, d)
    for k, v in m.head.state_dict().items():
        assert torch.equal(v, stored[k])


@pytest.fixture
def copy_of(tiny_paths, tmp_path):
    def make():
        dst = tmp_path / "copy"
        shutil.copytree(tiny_paths["qwen2-vl"], dst)
        return dst
    return make


def test_wrong_folders_are_refused(copy_of, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ReMatch.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        ReMatch.from_pretrained(tmp_path / "empty")
    for name in ["rematch_config.json", "rematch_head.safetensors", "tokenizer.json"]:
        d = copy_of()
        (d / name).unlink()
        with pytest.raises(CheckpointError, match=name):
            open_checkpoint(d)
        shutil.rmtree(d)


def test_other_model_type_and_pickle_only(copy_of):
    d = copy_of()
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="llama"):
        open_checkpoint(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(d)


def test_head_that_does_not_fit_the_config(copy_of):
    d = copy_of()
    state = load_file(str(d / "rematch_head.safetensors"))
    state["query_tokens"] = state["query_tokens"][:3]
    del state["projector.fc2.bias"]
    save_file(state, str(d / "rematch_head.safetensors"))
    with pytest.raises(CheckpointError, match="projector.fc2.bias.*query_tokens has shape"):
        ReMatch.from_pretrained(d)
    (d / "rematch_head.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot be read"):
        ReMatch.from_pretrained(d)


def test_bad_rematch_config(copy_of):
    d = copy_of()
    cfg = json.loads((d / "rematch_config.json").read_text())
    (d / "rematch_config.json").write_text(json.dumps({**cfg, "hidden_size": 999}))
    with pytest.raises(CheckpointError, match="hidden_size 999"):
        open_checkpoint(d)
    (d / "rematch_config.json").write_text(json.dumps({**cfg, "num_learnable_tokens": -1}))
    with pytest.raises(ConfigError, match="num_learnable_tokens"):
        open_checkpoint(d)
    (d / "rematch_config.json").write_text(json.dumps({**cfg, "answer_yes": "Yes indeed"}))
    with pytest.raises(ConfigError, match="one token"):
        ReMatch.from_pretrained(d)
