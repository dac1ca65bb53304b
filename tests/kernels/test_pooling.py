"""The fused pooling kernel and its op: packed and padded layouts, against the torch reference."""
import pytest
import torch

from rematch_fast import ops

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
from rematch_fast.kernels import pooling as pool  # noqa: E402
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("lengths, d, K", [([20], 64, 1), ([17, 40, 16, 97], 96, 16), ([33, 18], 1536, 16)])
def test_packed_layout(lengths, d, K, dtype, atol):
    g = torch.Generator().manual_seed(sum(lengths) + d)
    hidden = torch.randn(sum(lengths), d, generator=g).to(DEVICE, dtype)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    rows = ops.learnable_rows_packed(cu, K)
    fused, unit = pool.pool_learnable_triton(hidden, rows)
    want_fused, want_unit = ops.pool_learnable_torch(hidden, rows)
    assert fused.dtype == unit.dtype == torch.float32 and fused.shape == (len(lengths), d)
    torch.testing.assert_close(fused, want_fused, atol=atol, rtol=0)
    torch.testing.assert_close(unit, want_unit, atol=atol, rtol=0)
    # by hand: the last K rows of each sequence
    ends = cu[1:].tolist()
    by_hand = torch.stack([hidden[e - K:e].double().mean(0) for e in ends])
    torch.testing.assert_close(fused.double(), by_hand, atol=atol, rtol=0)


@pytest.mark.parametrize("B, S, d, K", [(1, 16, 64, 16), (3, 41, 96, 4)])
def test_padded_layout_through_the_op(B, S, d, K):
    g = torch.Generator().manual_seed(B * S)
    hidden = torch.randn(B, S, d, generator=g).to(DEVICE)
    lengths = torch.tensor([S, K + 3, K][:B], device=DEVICE)
    fused, unit = ops.pool_learnable(hidden, K, lengths=lengths)
    by_hand = torch.stack([hidden[b, n - K:n].mean(0) for b, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(fused, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(unit, torch.nn.functional.normalize(by_hand, dim=-1), atol=1e-5, rtol=0)
    # the padded result equals the packed one over the same real rows
    packed = torch.cat([hidden[b, :n] for b, n in enumerate(lengths.tolist())])
    cu = torch.cat([torch.zeros(1, device=DEVICE, dtype=torch.long), lengths.cumsum(0)])
    torch.testing.assert_close(ops.pool_learnable(packed, K, cu_seqlens=cu)[0], fused, atol=1e-6, rtol=0)
    if DEVICE == "cpu":  # the op dispatches to the torch reference on the CPU: run the kernel as well
        torch.testing.assert_close(pool.pool_learnable_triton(hidden.reshape(-1, d),
                                   ops.learnable_rows_padded(lengths, S, K))[0], fused, atol=1e-5, rtol=0)


def test_op_registration_and_fake():
    hidden = torch.randn(30, 32)
    rows = ops.learnable_rows_packed(torch.tensor([0, 12, 30]), 4)
    torch.library.opcheck(torch.ops.rematch_fast.pool_learnable.default, (hidden, rows))
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.pool_learnable(hidden, 4)
