"""The reference backend on a CUDA device (skipped where there is none)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import random_image
from rematch_fast import Item, ReMatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")

ITEMS = ["a short text", Item(text="caption", image=random_image(97, 213, seed=31)),
         Item(image=random_image(1000, 30, seed=32)), "another, longer text " * 8]


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def pair(request, tiny_paths, models):
    cuda32 = ReMatch.from_pretrained(tiny_paths[request.param], device="cuda", dtype=torch.float32)
    cuda16 = ReMatch.from_pretrained(tiny_paths[request.param], device="cuda", dtype=torch.bfloat16)
    return models[request.param], cuda32, cuda16


def test_cuda_fp32_equals_cpu(pair):
    cpu, cuda32, _ = pair
    torch.testing.assert_close(cuda32.embed(ITEMS, side="document"), cpu.embed(ITEMS, side="document"),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(cuda32.match(ITEMS[1], ITEMS), cpu.match(ITEMS[1], ITEMS), atol=1e-4, rtol=0)


def test_cuda_bf16_stays_close(pair):
    cpu, _, cuda16 = pair
    e16, e32 = cuda16.embed(ITEMS, side="query"), cpu.embed(ITEMS, side="query")
    assert e16.dtype == torch.float32 and e16.device.type == "cpu"
    assert F.cosine_similarity(e16, e32, dim=-1).min() >= 0.99
    p16 = cuda16.match(ITEMS[0], ITEMS, query_view="feat", doc_view="feat")
    assert (p16 - cpu.match(ITEMS[0], ITEMS, query_view="feat", doc_view="feat")).abs().max() < 0.02
