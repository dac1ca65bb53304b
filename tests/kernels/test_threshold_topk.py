"""The threshold-compaction top-k kernel: under TRITON_INTERPRET=1 on the CPU, compiled on a GPU.

Most data here is in halves or quarters, so that every dot product is exact in any summation
order: the kernel's packed keys must then equal the torch reference's bit for bit, ties included."""
import pytest
import torch

from rematch_fast.similarity import compute_dtype, quantize_int8_rows, topk_keys_torch

import triton  # noqa: E402,F401 - the test extra installs it: missing, these tests fail rather than skip
from rematch_fast.kernels import threshold_topk as tt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter


def _halves(n, d, seed, lo=-4, hi=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(lo, hi, (n, d), generator=g) / 2).to(DEVICE)


def _both(q, c, k, scale=None, **launch):
    """(the kernel's keys, the reference's keys), queries rounded as the index rounds them."""
    q = q.to(compute_dtype(c.dtype))
    return tt.topk_keys_threshold(q, c, k, scale, **launch), topk_keys_torch(q, c, k, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Q, N, d, k", [(1, 1, 16, 1), (3, 97, 40, 7), (2, 5000, 64, 100), (50, 4500, 24, 10),
                                        (1, 4097, 8, 4097)])
def test_keys_equal_the_reference(Q, N, d, k, dtype):
    q, c = _halves(Q, d, seed=N + k), _halves(N, d, seed=N * 3 + d).to(dtype)
    got, want = _both(q, c, k)
    assert got.shape == (Q, k) and got.dtype == torch.int64
    assert torch.equal(got, want)


def test_k_2048_over_several_passes():
    q, c = _halves(2, 16, seed=1), _halves(9000, 16, seed=2).half()
    stats = {}
    got, want = _both(q, c, 2048, capacity=4096, stats=stats)
    assert torch.equal(got, want) and stats["passes"] >= 2


def test_an_ascending_corpus_overflows_and_raises_the_threshold_until_exact():
    """Scores that grow with the row: the first rows' threshold is the worst possible, the buffer
    overflows, and each pass takes a higher threshold from the candidates it kept."""
    d = 8
    q = torch.ones(3, d, device=DEVICE)
    c = (torch.arange(6000, device=DEVICE)[:, None] / 8 % 256).float().repeat(1, d) / d  # ascending, with ties
    stats = {}
    got, want = _both(q, c, 30, capacity=256, stats=stats)
    assert torch.equal(got, want) and stats["passes"] >= 3


def test_all_equal_scores_and_duplicated_rows_go_to_the_lower_rows():
    c = _halves(1, 32, seed=3).repeat(3000, 1)
    got, want = _both(_halves(4, 32, seed=4), c, 100, capacity=512, splits=5)
    assert torch.equal(got, want)
    assert ((tt._MIN_KEY < got) & ((0xFFFFFFFF - (got & 0xFFFFFFFF)) < 100)).all()  # rows 0..99
    base = _halves(8, 32, seed=5)
    c = base[torch.tensor([3, 1, 3, 3, 0, 1] * 400, device=DEVICE)]  # duplicates across every split
    got, want = _both(base[[1, 3]], c, 50, capacity=1024, splits=7)
    assert torch.equal(got, want)


def test_split_count_and_query_blocks_do_not_change_the_answer():
    q, c = _halves(70, 24, seed=6), _halves(3000, 24, seed=7).half()
    want = topk_keys_torch(q.half(), c, 40)
    for splits in (1, 3, 11):
        assert torch.equal(tt.topk_keys_threshold(q.half(), c, 40, splits=splits), want)
    assert torch.equal(tt.topk_keys_threshold(q.half(), c, 40, blocks={"BQ": 16}), want)


def test_int8_corpus_with_row_scales():
    c8, scale = quantize_int8_rows(_halves(3000, 32, seed=8))
    scale = (torch.randint(1, 9, scale.shape, generator=torch.Generator().manual_seed(9)) / 64).to(DEVICE)  # exact
    got, want = _both(_halves(5, 32, seed=10), c8, 64, scale)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="per-row scale"):
        tt.topk_keys_threshold(_halves(1, 32, seed=0).half(), c8, 3)


def test_fp8_corpus_with_row_scales():
    """e4m3 rows (halves up to 2 are exact in e4m3) times power-of-two scales: exact keys."""
    c8 = _halves(3000, 32, seed=13).to(torch.float8_e4m3fn)
    scale = (2.0 ** torch.randint(-3, 3, (3000,), generator=torch.Generator().manual_seed(14))).to(DEVICE)
    got, want = _both(_halves(6, 32, seed=15), c8, 50, scale, capacity=512)
    assert torch.equal(got, want)


def test_a_first_threshold_set_too_high_is_recovered(monkeypatch):
    """If the first rows' keys came out higher than the full pass computes them (a last-bit
    difference), fewer than k candidates reach the threshold: those queries run again without one."""
    real = tt._select
    calls = []

    def first_pass_too_high(q, corpus, scale, thr, n_rows, cap, cfg, splits):
        count, buf = real(q, corpus, scale, thr, n_rows, cap, cfg, splits)
        if not calls:
            buf = torch.where(buf > tt._MIN_KEY, buf + (1 << 40), buf)  # every sample score a little higher
        calls.append(n_rows)
        return count, buf

    monkeypatch.setattr(tt, "_select", first_pass_too_high)
    stats = {}
    got, want = _both(_halves(3, 16, seed=11), _halves(5000, 16, seed=12), 20, capacity=256, stats=stats)
    assert torch.equal(got, want) and stats["passes"] >= 3 and len(calls) == stats["passes"]


def test_capacity_below_k_is_refused():
    with pytest.raises(ValueError, match="capacity must be >= k"):
        tt.topk_keys_threshold(_halves(1, 8, seed=0), _halves(100, 8, seed=1), 50, capacity=10)
