"""The backend contract in code: the Protocol, the registry with lazy imports, option checks,
and the deprecated E* names."""
import pytest
import torch

from rematch_fast import Embeddings, InputError, ReMatch
from rematch_fast.backends import Backend, create_backend, register_backend, registered_backends
from rematch_fast.backends import base


def test_built_in_backends_register_lazily_and_satisfy_the_protocol(models, tiny_paths):
    assert {"reference", "fast"} <= set(registered_backends())
    assert isinstance(models["qwen2-vl"].backend, Backend)
    fast = ReMatch.from_pretrained(tiny_paths["qwen2-vl"], backend="fast")
    assert isinstance(fast.backend, Backend) and fast.backend.inputs == frozenset(base.INPUT_KINDS)
    assert not isinstance(object(), Backend)


def test_unknown_backend_lists_the_registered_ones(tiny_paths):
    with pytest.raises(InputError, match=r"unknown backend 'openvino'; registered: \[.*'fast'.*'reference'.*'tensorrt'"):
        ReMatch.from_pretrained(tiny_paths["qwen2-vl"], backend="openvino")


def test_options_are_checked_against_the_factory(tiny_paths):
    with pytest.raises(InputError, match=r"takes no option \['latency_buckets'\]; its options: \[\]"):
        ReMatch.from_pretrained(tiny_paths["qwen2-vl"], backend="reference", latency_buckets=(64,))
    with pytest.raises(InputError, match=r"takes no option \['kernel'\]; its options: \['latency_buckets', 'kernels', 'share_prefix', 'quantize', 'uint8_pixels', 'compile', 'packed_graphs'\]"):
        ReMatch.from_pretrained(tiny_paths["qwen2-vl"], backend="fast", kernel="torch")


class TextOnly:
    """A backend that plugs in from outside: E* = the mean of its readout rows' token ids."""

    name = "text-only"
    padded = False
    longest_first = True
    inputs = frozenset({"text", "soft"})

    def __init__(self, ckpt, device, dtype, scale: float = 1.0):
        self.dim, self.scale = ckpt.config.hidden_size, scale

    def pooled(self, seqs):
        rows = torch.stack([s.input_ids[s.readout[0] - 3:][:1].float().expand(self.dim) * self.scale for s in seqs])
        return Embeddings.from_pooled(rows + torch.arange(self.dim))

    def answer_logits(self, seqs, answer_ids):
        return torch.tensor([[float(len(s)), 0.0] for s in seqs])


def test_a_new_backend_plugs_in_at_the_registry(tiny_paths, monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    register_backend("text-only", TextOnly)
    m = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], backend="text-only", scale=2.0)
    assert m.backend.scale == 2.0 and "text-only" in registered_backends()
    e = m.encode(["one", "two words"], side="document", batch_size=1)
    assert e.unit.shape == (2, m.dim) and torch.allclose(e.unit.norm(dim=-1), torch.ones(2))
    assert m.match("q", ["a", "b c d"]).shape == (2,)
    # what it declares it cannot take is a typed error naming the item, not a crash inside it
    from conftest import random_image
    with pytest.raises(InputError, match="item 1: backend 'text-only' takes no images"):
        m.encode(["fine", {"image": random_image(40, 40, 1)}])
    register_backend("lazy", "rematch_fast.no_such_module:Backend")  # imported only when asked for
    with pytest.raises(ModuleNotFoundError):
        create_backend("lazy", m.checkpoint, torch.device("cpu"), torch.float32)


def test_deprecated_names_still_work_and_warn():
    e = Embeddings.from_pooled(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)))
    with pytest.warns(DeprecationWarning, match="pooled"):
        old = e.fused
    torch.testing.assert_close(old, e.pooled)
    with pytest.warns(DeprecationWarning, match="from_pooled"):
        again = Embeddings.from_fused(e.pooled)
    torch.testing.assert_close(again.unit, e.unit)
    from rematch_fast.backends import backend_class

    with pytest.warns(DeprecationWarning, match="backend_factory"):
        assert backend_class("reference").__name__ == "ReferenceBackend"


def test_dtypes_by_name_or_torch_dtype(tiny_paths):
    m = ReMatch.from_pretrained(tiny_paths["qwen2-vl"], dtype="float64")
    assert next(m.backend.model.parameters()).dtype == torch.float64 and m.embed(["x"]).dtype == torch.float32
    with pytest.raises(InputError, match=r"the model dtype must be one of \['bfloat16', 'float16', 'float32', 'float64'\]"):
        ReMatch.from_pretrained(tiny_paths["qwen2-vl"], dtype=torch.int8)
