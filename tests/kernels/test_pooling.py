"""The fused pooling kernel and its op: packed and padded layouts, against the torch reference
and against a computation by hand."""
import pytest
import torch

from rematch_fast import ops

import triton  # noqa: E402,F401 - the test extra installs it: missing, these tests fail rather than skip
from rematch_fast.kernels import pooling as pool  # noqa: E402
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter


def _by_hand(rows_of_each: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    pooled = torch.stack([r.double().mean(0) for r in rows_of_each])
    return pooled / pooled.norm(dim=-1, keepdim=True), pooled.norm(dim=-1)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("lengths, d, K", [([20], 64, 1), ([17, 40, 16, 97], 96, 16), ([33, 18], 1536, 16)])
def test_packed_layout(lengths, d, K, dtype, atol):
    g = torch.Generator().manual_seed(sum(lengths) + d)
    hidden = torch.randn(sum(lengths), d, generator=g).to(DEVICE, dtype)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    rows = ops.learnable_rows_packed(cu, K)
    unit, norm = pool.pool_learnable_triton(hidden, rows)
    want_unit, want_norm = ops.pool_learnable_torch(hidden, rows)
    assert unit.dtype == norm.dtype == torch.float32 and unit.shape == (len(lengths), d) and norm.shape == (len(lengths),)
    torch.testing.assert_close(unit, want_unit, atol=atol, rtol=0)
    torch.testing.assert_close(norm, want_norm, atol=atol, rtol=atol)
    # by hand: the last K rows of each sequence
    hand_unit, hand_norm = _by_hand([hidden[e - K:e] for e in cu[1:].tolist()])
    torch.testing.assert_close(unit.double(), hand_unit, atol=atol, rtol=0)
    torch.testing.assert_close(norm.double(), hand_norm, atol=atol, rtol=atol)


@pytest.mark.parametrize("B, S, d, K", [(1, 16, 64, 16), (3, 41, 96, 4)])
def test_padded_layout(B, S, d, K):
    g = torch.Generator().manual_seed(B * S)
    hidden = torch.randn(B, S, d, generator=g).to(DEVICE)
    lengths = torch.tensor([S, K + 3, K][:B], device=DEVICE)
    unit, norm = pool.pool_learnable_triton(hidden.reshape(-1, d), ops.learnable_rows_padded(lengths, S, K))
    hand_unit, hand_norm = _by_hand([hidden[b, n - K:n] for b, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(unit.double(), hand_unit, atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.double(), hand_norm, atol=1e-5, rtol=1e-5)
    # the padded result equals the packed one over the same real rows
    packed = torch.cat([hidden[b, :n] for b, n in enumerate(lengths.tolist())])
    cu = torch.cat([torch.zeros(1, device=DEVICE, dtype=torch.long), lengths.cumsum(0)])
    p_unit, p_norm = pool.pool_learnable_triton(packed, ops.learnable_rows_packed(cu, K))
    torch.testing.assert_close(p_unit, unit, atol=1e-6, rtol=0)
    torch.testing.assert_close(p_norm, norm, atol=1e-6, rtol=1e-6)
