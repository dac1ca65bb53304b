"""backend="fast" on a CUDA device: packed batches and the CUDA graphs behind latency_buckets
(skipped where there is no GPU)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import random_image
from rematch_fast import Item, ReMatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")

ITEMS = ["a short text", Item(text="caption", image=random_image(97, 213, seed=41)),
         Item(image=random_image(1000, 30, seed=42)), "another, longer text " * 8, "x"]


def test_fast_cuda_fp32_equals_cpu(tiny_paths, arch):
    cpu = ReMatch.from_pretrained(tiny_paths[arch], backend="fast")
    cuda = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", device="cuda")
    torch.testing.assert_close(cuda.embed(ITEMS, side="document"), cpu.embed(ITEMS, side="document"), atol=1e-4, rtol=0)


def test_fast_cuda_bf16_packed_batches_stay_close(tiny_paths, arch):
    """bf16 takes the varlen (flash) kernels for packed batches of several sequences."""
    cpu = ReMatch.from_pretrained(tiny_paths[arch], backend="fast")
    cuda = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", device="cuda", dtype=torch.bfloat16)
    e16, e32 = cuda.embed(ITEMS, side="query", batch_size=len(ITEMS)), cpu.embed(ITEMS, side="query")
    assert F.cosine_similarity(e16, e32, dim=-1).min() >= 0.99


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_latency_buckets_replay_cuda_graphs(tiny_paths, dtype, tol):
    path = tiny_paths["qwen2.5-vl"]
    plain = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=dtype)
    graphs = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=dtype, latency_buckets=(64, 128))
    queries = ["short query", "a somewhat longer query about rivers " * 4, "x", "short query", "blue " * 9]
    for _ in range(2):  # the second round replays graphs captured in the first, with other contents
        for q in queries:
            torch.testing.assert_close(graphs.embed([q]), plain.embed([q]), atol=tol, rtol=0)
        for n in (2, 3, 5):
            torch.testing.assert_close(graphs.embed(queries[:n]), plain.embed(queries[:n]), atol=tol, rtol=0)
    captured = graphs.backend.latency.static
    assert {B for B, _ in captured} == {1, 2, 4, 8} and all("graph" in s for s in captured.values())


def test_auto_kernels_on_cuda_equal_the_torch_references(tiny_paths, arch):
    """kernels="auto" builds the model with the custom ops (Triton on CUDA); "torch" with the references."""
    from rematch_fast import ops

    auto = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", device="cuda")
    plain = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", device="cuda", kernels="torch")
    assert auto.backend.ops is ops.CUSTOM_OPS and plain.backend.ops is ops.TORCH_OPS
    torch.testing.assert_close(auto.embed(ITEMS), plain.embed(ITEMS), atol=1e-4, rtol=0)


def test_the_reference_backend_never_runs_a_kernel(tiny_paths, monkeypatch):
    """The oracle must not share the kernels it checks: with every Triton entry point broken,
    the reference backend still embeds on CUDA."""
    import importlib

    for module, fn in [("pooling", "pool_learnable_triton"), ("rms_norm", "rms_norm_triton"),
                       ("silu_mul", "silu_mul_triton"), ("rope", "rope_triton"), ("similarity", "topk_keys_triton")]:
        monkeypatch.setattr(importlib.import_module(f"rematch_fast.kernels.{module}"), fn,
                            lambda *a, **k: (_ for _ in ()).throw(AssertionError("a kernel ran")))
    ref = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], device="cuda")
    assert ref.embed(ITEMS).shape == (len(ITEMS), ref.dim)
    fast = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], backend="fast", device="cuda")
    with pytest.raises(AssertionError, match="a kernel ran"):  # while the fast path does run them
        fast.embed(ITEMS)
