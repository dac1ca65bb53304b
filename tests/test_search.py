"""Index and search() on the CPU path (streamed torch reference); the kernels have their own tests."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import rematch_fast
from rematch_fast import Embeddings, Index, InputError
from rematch_fast.store import EmbeddingStore


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("Q, N, d, k", [(1, 1, 8, 1), (5, 97, 64, 7), (3, 1025, 96, 100)])
def test_search_equals_brute_force(Q, N, d, k):
    q, c = _unit(Q, d, Q), _unit(N, d, N)
    scores, ids = rematch_fast.search(q, c, k=k)
    assert scores.shape == ids.shape == (Q, k) and ids.dtype == torch.int64 and scores.dtype == torch.float32
    full = q.double() @ c.double().T
    want = full.sort(dim=-1, descending=True)
    torch.testing.assert_close(scores.double(), want.values[:, :k], atol=1e-6, rtol=0)
    assert torch.equal(ids, want.indices[:, :k])  # random data: no ties
    torch.testing.assert_close(torch.gather(full, 1, ids), scores.double(), atol=1e-6, rtol=0)


def test_ties_go_to_the_lower_row():
    base = torch.randint(-4, 5, (4, 16), generator=torch.Generator().manual_seed(0)) / 4  # exact dot products
    c = base[torch.tensor([2, 0, 1, 0, 3, 0, 2])]  # rows 1, 3, 5 equal; 0 and 6 equal
    scores, ids = rematch_fast.search(base[0], c, k=3)
    assert ids.tolist() == [[1, 3, 5]]
    scores, ids = rematch_fast.search(base[0], c, k=2)  # a tie across the k-th place
    assert ids.tolist() == [[1, 3]]
    scores, ids = rematch_fast.search(base[0][None].repeat(3, 1), c.flip(0), k=2)  # rows 1, 3, 5 of the flip
    assert ids.tolist() == [[1, 3]] * 3
    scores, ids = rematch_fast.search(base[2], c, k=2)
    assert ids.tolist() == [[0, 6]]


def test_streaming_in_small_chunks_gives_the_same_result(monkeypatch):
    q, c = _unit(9, 32, 1), _unit(5000, 32, 2)
    want = Index(c).search(q, 10)
    monkeypatch.setattr(importlib.import_module("rematch_fast.index"), "_CHUNK_FLOATS", 9 * 1024)
    got = Index(c).search(q, 10)  # five chunks of 1024 rows
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_index(dtype):
    q, c = _unit(6, 64, 3), _unit(800, 64, 4)
    idx = Index(c, dtype=dtype)
    assert idx.dtype == getattr(torch, dtype)
    scores, rows = idx.search(q, 10)
    qc, cc = q.to(idx.dtype).double(), idx.data.double()
    torch.testing.assert_close(torch.gather(qc @ cc.T, 1, rows), scores.double(), atol=1e-5, rtol=0)


def test_int8_index_recall():
    q, c = _unit(50, 256, 5), _unit(4000, 256, 6)
    _, exact = Index(c).search(q, 10)
    idx8 = Index(c, dtype="int8")
    assert idx8.data.dtype == torch.int8 and idx8.scale.shape == (4000,)
    scores8, approx = idx8.search(q, 10)
    # the scores are exact for what is stored: queries rounded to fp16 (the kernel's tensor-core
    # input for an int8 corpus) against int8 rows times their scale
    want = (q.half().double() @ idx8.data.double().T) * idx8.scale.double()[None]
    torch.testing.assert_close(scores8.double(), torch.gather(want, 1, approx), atol=1e-5, rtol=0)
    recall = sum(len(set(a) & set(b)) for a, b in zip(exact.tolist(), approx.tolist())) / exact.numel()
    assert recall >= 0.99
    # per-row int8 is off by at most scale/2 per element: a score by at most sum|q_i| * scale / 2
    fp32 = torch.gather(q.double() @ c.double().T, 1, approx)
    bound = q.double().abs().sum(dim=1, keepdim=True) * idx8.scale.double()[approx] / 2
    err = (scores8.double() - fp32).abs()
    assert (err <= bound + 1e-6).all() and err.max() > 0


def test_fp8_index_recall_and_error_bound():
    q, c = _unit(40, 256, 7), _unit(3000, 256, 8)
    _, exact = Index(c).search(q, 10)
    idx8 = Index(c, dtype="float8_e4m3fn")
    assert idx8.data.dtype == torch.float8_e4m3fn and idx8.scale.shape == (3000,)
    assert idx8.data.float().abs().amax(dim=1).eq(448).all()  # each row's scale maps its largest value to e4m3's max
    scores, approx = idx8.search(q, 10)
    want = (q.half().double() @ idx8.data.double().T) * idx8.scale.double()[None]  # exact for what is stored
    torch.testing.assert_close(scores.double(), torch.gather(want, 1, approx), atol=1e-5, rtol=0)
    recall = sum(len(set(a) & set(b)) for a, b in zip(exact.tolist(), approx.tolist())) / exact.numel()
    assert recall >= 0.9  # 3 mantissa bits: coarser than int8 for unit vectors, a quarter of fp32's bytes
    # e4m3 rounds each element to within 2**-4 of its size: a score moves by at most sum|q_i c_i| / 16
    err = (scores.double() - torch.gather(q.double() @ c.double().T, 1, approx)).abs()
    bound = torch.gather(q.double().abs() @ c.double().abs().T, 1, approx) / 16
    assert (err <= bound + 1e-3).all() and err.max() > 0


def test_index_from_store_maps_ids(tmp_path):
    e = Embeddings.from_pooled(torch.randn(20, 16, generator=torch.Generator().manual_seed(7)))
    ids = [f"doc{i}" for i in range(20)]
    EmbeddingStore(ids, e, "document").save(tmp_path)
    idx = Index.from_store(tmp_path)
    scores, rows = idx.search(e.unit[3], 2)
    assert idx.ids_of(rows)[0][0] == "doc3" and abs(float(scores[0, 0]) - 1) < 1e-5


def test_search_errors():
    c, q = _unit(10, 8, 0), _unit(2, 8, 1)
    for k in (0, 11, 2.5, True):
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
    inf_q = q.clone()
    inf_q[0, 0] = float("inf")
    with pytest.raises(InputError, match="infinite"):
        Index(c).search(inf_q, 1)
    with pytest.raises(InputError, match="floating"):
        rematch_fast.search(q, torch.ones(3, 8, dtype=torch.long), k=1)
    with pytest.raises(InputError, match="dtype"):
        Index(c, dtype="int4")
    with pytest.raises(InputError, match="ids"):
        Index(c, ids=["a"])


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_negative_zero_and_tied_scores_keep_their_order(kernels):
    """The order-preserving key packing across signs: negative, -0.0, +0.0 and tied scores come
    back best first with their exact values (ties to the lower row)."""
    corpus = torch.tensor([[-0.5], [-0.1], [0.3], [0.0], [-0.0], [-0.5], [-2.0], [1e-30], [-1e-30]])
    scores, rows = Index(corpus, kernels=kernels).search(torch.ones(1, 1), k=9)
    assert rows[0].tolist() == [2, 7, 3, 4, 8, 1, 0, 5, 6]
    assert torch.equal(scores[0], corpus[[2, 7, 3, 4, 8, 1, 0, 5, 6], 0] + 0.0)  # exact (-0.0 reads as 0.0)
    scores, rows = Index(corpus, kernels=kernels).search(-torch.ones(1, 1), k=3)  # the sign flipped
    assert rows[0].tolist() == [6, 0, 5] and scores[0].tolist() == [2.0, 0.5, 0.5]


def test_packing_round_trips_every_sign():
    from rematch_fast.similarity import pack_keys, unpack_keys

    g = torch.Generator().manual_seed(3)
    s = torch.cat([torch.randn(500, generator=g) * 10, torch.tensor([0.0, -0.0, 1e-38, -1e-38, 3e38, -3e38])])
    rows = torch.randint(0, 1 << 31, s.shape, generator=g)
    keys = pack_keys(s, rows)
    back, back_rows = unpack_keys(keys)
    assert torch.equal(back, s + 0.0) and torch.equal(back_rows, rows)
    order = torch.argsort(keys, descending=True)
    assert (s[order].diff() <= 0).all()  # key order is score order
    assert not torch.signbit(back[s == 0]).any()  # -0.0 comes back as +0.0


def test_negative_zero_ties_with_positive_zero():
    """-0.0 and +0.0 are one score: at one row they pack to one key, and the lower row ranks
    first whichever zero it holds (a BLAS may return either)."""
    from rematch_fast.similarity import pack_keys

    same_row = pack_keys(torch.tensor([-0.0, 0.0]), torch.tensor([5, 5]))
    assert same_row[0] == same_row[1]
    keys = pack_keys(torch.tensor([0.0, -0.0]), torch.tensor([9, 2]))  # -0.0 at the lower row
    assert keys[1] > keys[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_streamed_index_equals_the_resident_one(dtype):
    """Shards of any size (1 row, odd sizes, exactly N, more than N), k past a shard's size and
    k = N, duplicated rows and all-equal scores: the merged per-shard top-k is exactly the
    resident index's answer, ties to the lower row included. Values are multiples of 1/2, so
    every dot product is exact whatever the matmul's shape, and ties are real ties."""
    g = torch.Generator().manual_seed(20261127)
    c = torch.randint(-2, 3, (203, 24), generator=g).float() / 2
    c[50:60] = c[7]  # duplicated rows: equal scores across shard boundaries
    c[120:140] = 0.5  # all equal among themselves
    q = torch.cat([torch.randint(-2, 3, (6, 24), generator=g).float() / 2, c[7][None], torch.ones(1, 24)])
    resident = Index(c, dtype=dtype, mode="resident")
    assert resident.mode == "resident" and Index(c).mode == "resident"  # "auto" on the CPU
    for shard_rows in (1, 7, 64, 202, 203, 500):
        streamed = Index(c, dtype=dtype, mode="streamed", shard_rows=shard_rows)
        assert streamed.mode == "streamed" and streamed.data.device.type == "cpu"
        for k in (1, 10, 71, 203):
            want = resident.search(q, k)
            got = streamed.search(q, k)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (shard_rows, k)
    rows = Index(c, mode="streamed", shard_rows=9).search(q[6], 11)[1][0].tolist()
    assert rows == [7, *range(50, 60)]  # the duplicates (the best: c[7] . c[7]), in row order, across shards
    with pytest.raises(InputError, match="mode must be one of"):
        Index(c, mode="disk")
    with pytest.raises(InputError, match="shard_rows must be a positive integer"):
        Index(c, mode="streamed", shard_rows=0)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="streaming host shards to a device needs a CUDA GPU; none here")
@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_streamed_shards_on_cuda_equal_the_resident_index(kernels):
    """Pinned host shards copied on a side stream into two device buffers while the other is
    searched: the same answer as the resident index, bf16 and int8 (values in halves: every dot
    product exact, whatever kernel the shapes pick)."""
    g = torch.Generator().manual_seed(4)
    c = (torch.randint(-2, 3, (50_001, 64), generator=g).float() / 2).cuda()
    c[1000:1100] = c[5]
    q = (torch.randint(-2, 3, (33, 64), generator=g).float() / 2).cuda()
    for dtype in ("bfloat16", "int8"):
        resident = Index(c, dtype=dtype, kernels=kernels, mode="resident")
        streamed = Index(c, dtype=dtype, kernels=kernels, mode="streamed", shard_rows=4_097)
        assert streamed.data.is_pinned() and streamed.mode == "streamed"
        for k in (1, 100, 1000):
            want, got = resident.search(q, k), streamed.search(q, k)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (dtype, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels' k limit needs a CUDA GPU; none here")
def test_k_up_to_2048_on_cuda_then_a_clear_error():
    """Past the fused kernel's k = 1024 the index takes threshold compaction, up to 2048."""
    c = (torch.randint(-2, 3, (20_000, 32), generator=torch.Generator().manual_seed(6)).float() / 2).cuda()
    q = c[[3, 17, 9000]]
    index = Index(c, dtype="float16")
    for k in (1024, 1025, 2048):
        got = index.search(q, k)
        want = Index(c.cpu(), dtype="float16", kernels="torch").search(q.cpu(), k)
        assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0]), k
    with pytest.raises(InputError, match="at most k=2048"):
        index.search(q, 2049)
