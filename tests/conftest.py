"""Shared fixtures: one tiny checkpoint and one loaded model per architecture, per session."""
import os

import torch

# Without a GPU, Triton kernels run in its CPU interpreter; this must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from rematch_fast import ReMatch  # noqa: E402
from rematch_fast.tiny import make_tiny_checkpoint  # noqa: E402

ARCHES = ["qwen2-vl", "qwen2.5-vl"]


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {a: make_tiny_checkpoint(root / a, arch=a, seed=0) for a in ARCHES}


@pytest.fixture(scope="session")
def models(tiny_paths):
    return {a: ReMatch.from_pretrained(p, backend="reference", device="cpu", dtype=torch.float32)
            for a, p in tiny_paths.items()}


@pytest.fixture(params=ARCHES)
def arch(request):
    return request.param


@pytest.fixture
def model(models, arch):
    return models[arch]


@pytest.fixture
def interpreter_rounds_bf16(monkeypatch):
    """Triton's CPU interpreter narrows fp32 to bf16 by truncation; GPUs round to nearest even. For
    bf16 error budgets on the CPU, its casts round as a GPU's do (tests/triton_rounding.py)."""
    from triton_rounding import round_bf16_like_a_gpu  # imports Triton: only the tests that ask for it

    round_bf16_like_a_gpu(monkeypatch)


def random_image(w, h, seed, mode="RGB"):
    """A noisy image (never flat), of any size."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB") if mode == "RGB" else Image.fromarray(a, "RGB").convert(mode)


def with_outlier_channels(src, dst):
    """A copy of a tiny checkpoint whose hidden states carry outlier channels: three channels of
    every norm weight scaled x50, as trained LLMs have (random weights have none)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    for name, w in weights.items():
        if name.endswith("layernorm.weight"):
            w[:3] *= 50
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def document_first_copy(src, dst):
    """A copy of a checkpoint whose matching template shows the document before the query (no
    shared query prefix)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "rematch_config.json").read_text())
    cfg["match_template"] = ("<|im_start|>user\nDocument:\n{document}<|im_end|>\n<|im_start|>user\n"
                             "Query:\n{query}<|im_end|>\n<|im_start|>assistant\n")
    (dst / "rematch_config.json").write_text(json.dumps(cfg))
    return dst


# Benchmarks time things rather than test them: run them only when asked (pytest --benchmark-only).
def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", False):
        return
    timed = [item for item in items if "benchmark" in getattr(item, "fixturenames", ())]
    if timed:
        config.hook.pytest_deselected(items=timed)
        items[:] = [item for item in items if item not in timed]
