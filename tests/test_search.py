import importlib

import pytest
import torch
import torch.nn.functional as F

import rematch_fast
from rematch_fast import Embeddings, InputError


@pytest.mark.parametrize("Q, N, d, k", [(1, 1, 8, 1), (5, 97, 64, 7), (3, 1025, 96, 100)])
def test_search_equals_brute_force(Q, N, d, k):
    g = torch.Generator().manual_seed(Q * 1000 + N)
    q = F.normalize(torch.randn(Q, d, generator=g), dim=-1)
    c = F.normalize(torch.randn(N, d, generator=g), dim=-1)
    scores, ids = rematch_fast.search(q, c, k=k)
    assert scores.shape == ids.shape == (Q, k) and ids.dtype == torch.int64
    full = q @ c.T
    want = full.sort(dim=-1, descending=True).values[:, :k]
    torch.testing.assert_close(scores, want)
    torch.testing.assert_close(torch.gather(full, 1, ids), scores)  # each id carries its own score
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_search_takes_embeddings_and_bounds_memory(monkeypatch):
    s = importlib.import_module("rematch_fast.search")  # the module; rematch_fast.search is the function

    monkeypatch.setattr(s, "_SCORE_BUDGET", 50)  # force several query blocks
    g = torch.Generator().manual_seed(0)
    e = Embeddings.from_fused(torch.randn(40, 16, generator=g))
    q = F.normalize(torch.randn(9, 16, generator=g), dim=-1)
    a = rematch_fast.search(q, e, k=5)
    b = torch.topk(q @ e.unit.T, 5)
    torch.testing.assert_close(a[0], b.values)


def test_search_errors():
    c = F.normalize(torch.randn(10, 8), dim=-1)
    q = F.normalize(torch.randn(2, 8), dim=-1)
    for k in (0, 11, 2.5):
        with pytest.raises(InputError, match="k must"):
            rematch_fast.search(q, c, k=k)
    with pytest.raises(InputError, match="dimension"):
        rematch_fast.search(torch.randn(2, 9), c, k=1)
    with pytest.raises(InputError, match="empty"):
        rematch_fast.search(q, torch.empty(0, 8), k=1)
    bad = c.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        rematch_fast.search(q, bad, k=1)
    with pytest.raises(InputError, match="floating"):
        rematch_fast.search(q, torch.ones(3, 8, dtype=torch.long), k=1)
