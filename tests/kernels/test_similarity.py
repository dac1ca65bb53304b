"""The fused similarity + top-k kernel: under TRITON_INTERPRET=1 on the CPU, compiled on a GPU."""
import pytest
import torch
import torch.nn.functional as F

from rematch_fast.similarity import compute_dtype, quantize_int8_rows, topk_similarity_torch, unpack_keys

import triton  # noqa: E402,F401 - the test extra installs it: missing, these tests fail rather than skip
from rematch_fast.kernels import similarity as sim  # noqa: E402
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter


def triton_topk(q, c, k, scale=None, **launch):
    """The kernel as the index calls it: queries rounded to the dot product's precision, keys unpacked."""
    return unpack_keys(sim.topk_keys_triton(q.to(compute_dtype(c.dtype)), c, k, scale, **launch))


def _unit(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1).to(DEVICE, dtype)


def _check(q, c, k, scores, rows, scale=None, atol=2e-5):
    """Scores match an fp64 recomputation; ids exact except among scores tied within atol."""
    qd = q.to(c.dtype if c.dtype != torch.int8 else torch.float16).double()
    full = qd @ c.double().T
    if scale is not None:
        full = full * scale.double()[None]
    want = full.sort(dim=1, descending=True, stable=True)
    torch.testing.assert_close(scores.double(), want.values[:, :k], atol=atol, rtol=0)
    torch.testing.assert_close(torch.gather(full, 1, rows), scores.double(), atol=atol, rtol=0)
    for r in range(rows.shape[0]):
        assert len(set(rows[r].tolist())) == k
        differ = rows[r] != want.indices[r, :k]
        if differ.any():  # only where the true scores tie (within tolerance)
            kth = want.values[r, k - 1]
            assert ((full[r, rows[r][differ]] - kth).abs() <= 2 * atol).all() or \
                   ((full[r, rows[r][differ]] - full[r, want.indices[r, :k][differ]]).abs() <= 2 * atol).all()


CASES = [  # (Q, N, d, k): the awkward sizes, each seen at least once
    (1, 1, 64, 1), (3, 97, 96, 7), (2, 97, 1536, 1), (5, 1023, 64, 100),
    (1, 1025, 96, 7), (4, 1025, 1536, 100), (33, 1023, 96, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Q, N, d, k", CASES)
def test_topk_matches_reference(Q, N, d, k, dtype):
    q, c = _unit(Q, d, seed=N + d), _unit(N, d, seed=N * 7 + k, dtype=dtype)
    scores, rows = triton_topk(q, c, k)
    assert scores.shape == rows.shape == (Q, k) and scores.dtype == torch.float32 and rows.dtype == torch.int64
    _check(q, c, k, scores, rows)
    # the packed-key reference the CPU index uses: same scores; ids may swap only between near-ties,
    # which _check above already allows (the two sum in different orders)
    ref_scores, _ = topk_similarity_torch(q, c, k)
    torch.testing.assert_close(scores, ref_scores, atol=2e-5, rtol=0)


def test_k_1024_and_many_splits():
    q, c = _unit(3, 64, 1), _unit(5000, 64, 2)
    scores, rows = triton_topk(q, c, 1024, splits=3)
    _check(q, c, 1024, scores, rows)


def test_split_count_does_not_change_the_answer():
    q, c = _unit(5, 96, 3), _unit(3000, 96, 4, torch.float16)
    a = triton_topk(q, c, 50, splits=1)
    b = triton_topk(q, c, 50, splits=7)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_ties_break_to_the_lower_row():
    # quarter-integers: every dot product is exact in any summation order, so the ties are exact
    base = (torch.randint(-4, 5, (8, 64), generator=torch.Generator().manual_seed(5)) / 4).to(DEVICE)
    pick = torch.tensor([3, 1, 3, 3, 0, 1] * 50, device=DEVICE)  # 300 rows, heavy exact ties
    c = base[pick]
    scores, rows = triton_topk(base[[1, 3]], c, 10, splits=4)
    want = [sorted(torch.nonzero(pick == j).flatten().tolist())[:10] for j in (1, 3)]
    assert rows.tolist() == want


def test_int8_corpus_matches_reference_and_recall():
    q, c = _unit(20, 96, 6), _unit(2000, 96, 7)
    c8, scale = quantize_int8_rows(c)
    scores, rows = triton_topk(q, c8, 10, scale)
    _check(q, c8, 10, scores, rows, scale=scale)
    _, exact = triton_topk(q, c, 10)
    recall = sum(len(set(a) & set(b)) for a, b in zip(exact.tolist(), rows.tolist())) / exact.numel()
    assert recall >= 0.99
    # the error bound of per-row int8: each element is off by at most scale/2, so a score by at most
    # sum|q_i| * scale / 2 from the fp32 score of the same row
    fp32 = torch.gather(q.double() @ c.double().T, 1, rows)
    bound = q.double().abs().sum(dim=1, keepdim=True) * scale.double()[rows] / 2
    err = (scores.double() - fp32).abs()
    assert (err <= bound + 1e-6).all() and err.max() > 0  # really quantized, and within the bound


def test_fp8_corpus_equals_the_reference():
    """e4m3 rows of halves (exact in e4m3) times power-of-two scales: every score exact, so the
    fused kernel's keys equal the reference's, ties included."""
    from rematch_fast.similarity import topk_keys_torch

    g = torch.Generator().manual_seed(16)
    c = (torch.randint(-4, 5, (2000, 64), generator=g) / 2).to(DEVICE, torch.float8_e4m3fn)
    scale = (2.0 ** torch.randint(-3, 3, (2000,), generator=g)).to(DEVICE)
    q = (torch.randint(-4, 5, (7, 64), generator=g) / 2).to(DEVICE, torch.float16)
    want = topk_keys_torch(q, c, 33, scale)
    assert torch.equal(sim.topk_keys_triton(q, c, 33, scale, splits=3), want)
    with pytest.raises(ValueError, match="per-row scale"):
        sim.topk_keys_triton(q, c, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot is wrong in the interpreter; GPU only")
def test_bf16_within_flash_tolerance_rule():
    q, c32 = _unit(64, 1536, 8), _unit(20000, 1536, 9)
    c = c32.bfloat16()
    exact = (q.double() @ c32.double().T)
    scores, rows = triton_topk(q, c, 100)
    torch_scores = torch.topk(q.bfloat16() @ c.T, 100).values.float()  # what torch bf16 gives
    err_torch = (torch_scores.double() - exact.topk(100).values).abs().max()
    err_ours = (scores.double() - torch.gather(exact, 1, rows)).abs().max()
    assert err_ours <= 2 * err_torch + 1e-5
    # selection: the rows returned are the true top-100 of the bf16 corpus, up to near-ties
    stored = q.double() @ c.double().T
    picked = torch.gather(stored, 1, rows).sort(dim=1, descending=True).values
    torch.testing.assert_close(picked, stored.topk(100).values, atol=float(2 * err_torch + 1e-5), rtol=0)


def test_kernel_orders_negative_and_zero_scores():
    """Mixed signs through the kernel's own key packing (_pack), in the interpreter or on a GPU."""
    c = torch.tensor([[-0.5], [-0.1], [0.3], [0.0], [-0.0], [-0.5], [-2.0]], device=DEVICE)
    scores, rows = triton_topk(torch.ones(1, 1, device=DEVICE), c, 7)
    assert rows[0].tolist() == [2, 3, 4, 1, 0, 5, 6]
    assert scores[0].tolist() == [0.30000001192092896, 0.0, 0.0, -0.10000000149011612, -0.5, -0.5, -2.0]
