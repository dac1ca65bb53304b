"""What both search kernels (similarity.py, threshold_topk.py) compute per tile: the scores of a
block of queries against a tile of corpus rows, and their packed int64 keys (the layout of
rematch_fast.similarity.pack_keys: the score's order-preserving bits high, (2^32 - 1 - row) low,
so the largest key is the best score and, among equal scores, the lower row)."""
import triton
import triton.language as tl


@triton.jit
def _pack(scores, cols):
    bits = (scores + 0.0).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - cols)  # cols is int64


@triton.jit
def _score_tile(q_ptr, c_ptr, scale_ptr, rows_q, q_ok, cols, c_ok, D, stride_q, stride_c,
                HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    # scores [BQ, BN] fp32 of queries rows_q against corpus rows cols: a tensor-core dot over D in
    # chunks of BD (the corpus converted to the queries' dtype after the load), row scales after it
    acc = tl.zeros((BQ, BN), tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        d_ok = dd < D
        qb = tl.load(q_ptr + rows_q[:, None] * stride_q + dd[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        cb = tl.load(c_ptr + cols[None, :] * stride_c + dd[:, None], mask=c_ok[None, :] & d_ok[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(qb, cb.to(qb.dtype), input_precision="ieee")
        else:
            acc += tl.dot(qb, cb.to(qb.dtype))
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + cols, mask=c_ok, other=0.0)[None, :]
    return acc
