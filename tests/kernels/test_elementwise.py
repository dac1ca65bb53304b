"""The decoder's fused elementwise kernels (RMSNorm, the residual add fused with it, SwiGLU gate,
rotary embedding alone and fused with the q/k/v split) against their torch references, on
strided inputs and sizes that are not powers of two."""
import pytest
import torch

from rematch_fast import ops

import triton  # noqa: E402,F401 - the test extra installs it: missing, these tests fail rather than skip
from rematch_fast.kernels.rms_norm import add_rms_norm_triton, rms_norm_triton  # noqa: E402
from rematch_fast.kernels.rope import qkv_rope_triton, rope_triton  # noqa: E402
from rematch_fast.kernels.silu_mul import silu_mul_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)]


def _randn(*shape, seed, dtype, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("N, D", [(1, 64), (37, 80), (5, 1280), (3, 2048)])
def test_rms_norm(N, D, dtype, tol):
    x = _randn(N, D + 7, seed=N * D, dtype=dtype, scale=3.0)[:, 3:D + 3]  # rows with a gap between them
    w = _randn(D, seed=D, dtype=dtype)
    got = rms_norm_triton(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), ops.rms_norm_torch(x, w, 1e-6).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("N, D", [(1, 64), (29, 96), (4, 1280), (3, 2048)])
def test_add_rms_norm(N, D, dtype, tol):
    x = _randn(N, D + 5, seed=N + D, dtype=dtype, scale=4.0)[:, 2:D + 2]  # strided rows
    delta = _randn(N, D, seed=N * D + 1, dtype=dtype, scale=2.0)
    w = _randn(D, seed=D + 3, dtype=dtype)
    s, y = add_rms_norm_triton(x, delta, w, 1e-6)
    want_s, want_y = ops.add_rms_norm_torch(x, delta, w, 1e-6)
    assert s.dtype == y.dtype == dtype and s.shape == y.shape == x.shape
    if DEVICE == "cuda" or dtype == torch.float32:
        assert torch.equal(s, want_s)  # one rounding of the fp32 sum to nearest, as torch's add
    else:  # the interpreter casts fp32 to bf16 by truncation: off by at most one step of 2**-7
        torch.testing.assert_close(s.float(), want_s.float(), atol=0, rtol=2**-7)
    torch.testing.assert_close(y.float(), want_y.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(want_y, ops.rms_norm_torch(x + delta, w, 1e-6), atol=0, rtol=0)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("N, I", [(1, 128), (19, 344), (4, 3000)])
def test_silu_mul(N, I, dtype, tol):
    gate_up = _randn(N, 2 * I, seed=N + I, dtype=dtype, scale=2.0)
    got = silu_mul_triton(gate_up)
    assert got.dtype == dtype and got.shape == (N, I)
    torch.testing.assert_close(got.float(), ops.silu_mul_torch(gate_up).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("T, H, D, layout", [(1, 4, 16, "dense"), (23, 12, 128, "qkv"), (9, 16, 80, "vision"), (6, 3, 40, "dense")])
def test_rope(T, H, D, layout, dtype, tol):
    if layout == "qkv":  # q as it leaves the fused q/k/v projection: [T, (H + 2*2) * D] viewed [T, H, D]
        x = _randn(T, (H + 4) * D, seed=T * H, dtype=dtype)[:, : H * D].reshape(T, H, D)
    elif layout == "vision":  # q as it leaves the vision qkv: [T, 3, H, D] unbound
        x = _randn(T, 3, H, D, seed=T * H, dtype=dtype).unbind(1)[0]
    else:
        x = _randn(T, H, D, seed=T * H, dtype=dtype)
    angles = torch.rand(T, D // 2, generator=torch.Generator().manual_seed(D)) * 50
    angles = torch.cat([angles, angles], dim=-1).to(DEVICE)
    got = rope_triton(x, angles.cos(), angles.sin())
    assert got.dtype == dtype and got.shape == (T, H, D) and got.is_contiguous()
    torch.testing.assert_close(got.float(), ops.rope_torch(x, angles.cos(), angles.sin()).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("T, H, Hkv, D, gap", [(1, 4, 2, 16, 0), (23, 12, 2, 128, 0), (9, 16, 16, 80, 8),
                                               (6, 3, 1, 40, 3), (4, 28, 4, 64, 2), (0, 2, 1, 8, 0)])
def test_qkv_rope(T, H, Hkv, D, gap, dtype, tol):
    """Split, rotary and v's dense copy in one pass: decoder GQA shapes (7B's 28 + 2 x 4 heads span
    five programs, the last one partly), the vision tower's (H = Hkv), head counts that are not powers
    of two, rows with a gap after them, no rows at all."""
    width = (H + 2 * Hkv) * D
    qkv = _randn(T, width + gap, seed=T * H + D, dtype=dtype, scale=2.0)[:, :width]
    angles = torch.rand(T, D // 2, generator=torch.Generator().manual_seed(D + 1)) * 50
    angles = torch.cat([angles, angles], dim=-1).to(DEVICE)
    got = qkv_rope_triton(qkv, angles.cos(), angles.sin(), H, Hkv)
    want = ops.qkv_rope_torch(qkv, angles.cos(), angles.sin(), H, Hkv)
    for g, w, heads in zip(got, want, (H, Hkv, Hkv)):
        assert g.dtype == dtype and g.shape == (T, heads, D) and g.is_contiguous()
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got[1].float(), want[1].float(), atol=tol, rtol=tol)
    assert torch.equal(got[2], want[2])  # v is copied, never rounded
    # the reference itself: the separate rotations of the split projection
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    assert torch.equal(want[0], ops.rope_torch(q.reshape(T, H, D), angles.cos(), angles.sin()))
    assert torch.equal(want[1], ops.rope_torch(k.reshape(T, Hkv, D), angles.cos(), angles.sin()))
    assert torch.equal(want[2], v.reshape(T, Hkv, D))
    assert T == 0 or want[2].data_ptr() != qkv.data_ptr()  # a copy, never a view of the input
