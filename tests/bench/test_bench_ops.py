"""Micro-benchmarks of each op, timed by pytest-benchmark: `pytest tests/bench --benchmark-only`.

On the CPU they time the torch references (what the CPU path runs); with a CUDA GPU visible
they also time the custom ops on CUDA tensors (the Triton kernels through the dispatcher).
The default test run deselects them (see tests/conftest.py). Each one also checks its result
against a direct float64 computation, so a benchmark that times a wrong answer fails.

extra_info records the shape, dtype and bytes each call must read and write at least; with
the mean time that gives an effective bandwidth, stored as `GB/s` as well.
"""
import pytest
import torch
import torch.nn.functional as F

import pytest_benchmark  # noqa: E402,F401 - the test extra installs it: missing, this file fails rather than skips

from rematch_fast.ops import learnable_rows_packed, select_ops  # noqa: E402
from rematch_fast.similarity import (  # noqa: E402
    DEFAULT_CHUNK_ROWS, compute_dtype, quantize_int8_rows, select_topk, unpack_keys,
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")),
]
# The dtype each device's model runs in (the CPU model is fp32, the CUDA one bf16).
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def _ops(device):
    # what a model built with kernels="auto" runs: the torch references on the CPU, the custom ops on CUDA
    return select_ops("auto", device)


def _randn(*shape, seed, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU so both devices see the same numbers
    return torch.randn(*shape, generator=g).to(device, dtype)


def _run(benchmark, fn, *args, device, shape, dtype, nbytes):
    """Time fn(*args) and return its result; on CUDA the call waits for the kernel, and a first
    untimed call keeps Triton's compile out of the calibration."""
    if device == "cuda":
        fn(*args)
        torch.cuda.synchronize()

    def call():
        out = fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(device=device, shape=shape, dtype=str(dtype).removeprefix("torch."),
                                bytes=int(nbytes))
    out = benchmark(call)
    stats = getattr(benchmark, "stats", None)  # None when timing is disabled
    if stats is not None and stats.stats.mean > 0:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.mean / 1e9, 2)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_bench_pool_learnable(benchmark, device):
    B, K, d = 512, 16, 512
    dtype = DTYPE[device]
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(K, 4 * K, (B,), generator=g)  # packed sequences of 16..63 tokens
    cu = F.pad(lengths.cumsum(0), (1, 0))
    T = int(cu[-1])
    hidden = _randn(T, d, seed=2, device=device, dtype=dtype)
    rows = learnable_rows_packed(cu, K).to(device)
    nbytes = B * K * d * hidden.element_size() + rows.numel() * 8 + B * (d + 1) * 4

    unit, norm = _run(benchmark, _ops(device).pool_learnable, hidden, rows, device=device,
                      shape=f"hidden[{T},{d}] rows[{B},{K}]", dtype=dtype, nbytes=nbytes)

    assert unit.shape == (B, d) and norm.shape == (B,)
    assert unit.dtype == norm.dtype == torch.float32
    b = B // 3
    want = hidden[int(cu[b + 1]) - K: int(cu[b + 1])].double().mean(0)  # the last K rows of sequence b
    torch.testing.assert_close((unit[b] * norm[b]).double().cpu(), want.cpu(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(unit.norm(dim=-1).cpu(), torch.ones(B), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bench_rms_norm(benchmark, device):
    N, D, eps = 4096, 512, 1e-6
    dtype = DTYPE[device]
    x = _randn(N, D, seed=3, device=device, dtype=dtype)
    w = (1 + 0.1 * _randn(D, seed=4, device=device)).to(dtype)
    nbytes = 2 * N * D * x.element_size() + D * w.element_size()

    y = _run(benchmark, _ops(device).rms_norm, x, w, eps, device=device, shape=f"x[{N},{D}]", dtype=dtype,
             nbytes=nbytes)

    assert y.shape == (N, D) and y.dtype == dtype
    i = N // 2 + 7
    xi = x[i].double()
    want = xi * torch.rsqrt(xi.pow(2).mean() + eps) * w.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y[i].double().cpu(), want.cpu(), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_bench_silu_mul(benchmark, device):
    N, I = 4096, 1376
    dtype = DTYPE[device]
    gate_up = _randn(N, 2 * I, seed=5, device=device, dtype=dtype)
    nbytes = 3 * N * I * gate_up.element_size()  # read gate and up, write one [N, I]

    y = _run(benchmark, _ops(device).silu_mul, gate_up, device=device, shape=f"gate_up[{N},{2 * I}]", dtype=dtype,
             nbytes=nbytes)

    assert y.shape == (N, I) and y.dtype == dtype
    i = N - 5
    gate, up = gate_up[i, :I].double(), gate_up[i, I:].double()
    want = gate * torch.sigmoid(gate) * up
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y[i].double().cpu(), want.cpu(), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_bench_rope(benchmark, device):
    T, H, D = 2048, 8, 64
    dtype = DTYPE[device]
    x = _randn(T, H, D, seed=6, device=device, dtype=dtype)
    # real rotary tables: angle = position * theta^(-2j/D), each frequency used twice
    inv_freq = 1e6 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    angle = torch.cat([angle, angle], dim=-1)
    cos, sin = angle.cos().float().to(device), angle.sin().float().to(device)
    nbytes = 2 * T * H * D * x.element_size() + 2 * T * D * 4

    y = _run(benchmark, _ops(device).rope, x, cos, sin, device=device, shape=f"x[{T},{H},{D}]", dtype=dtype,
             nbytes=nbytes)

    assert y.shape == (T, H, D) and y.dtype == dtype
    t, h = 1234, 5
    x1, x2 = x[t, h, : D // 2].double(), x[t, h, D // 2:].double()
    c, s = angle[t, : D // 2].cos(), angle[t, : D // 2].sin()
    want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y[t, h].double().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["fused", "separate"])
def test_bench_qkv_rope(benchmark, device, path):
    """The step after the decoder's fused q/k/v projection (Qwen2.5-VL-3B heads): one qkv_rope
    against the separate path it replaced (rotate q, rotate k, v to dense rows: three launches)."""
    T, H, Hkv, D = 2048, 16, 2, 128
    dtype = DTYPE[device]
    qkv = _randn(T, (H + 2 * Hkv) * D, seed=7, device=device, dtype=dtype)
    angle = torch.rand(T, D // 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 100
    angle = torch.cat([angle, angle], dim=-1)
    cos, sin = angle.cos().float().to(device), angle.sin().float().to(device)
    nbytes = 2 * qkv.numel() * qkv.element_size() + 2 * T * D * 4
    ops = _ops(device)

    def separate(qkv, cos, sin):
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        return (ops.rope(q.reshape(T, H, D), cos, sin), ops.rope(k.reshape(T, Hkv, D), cos, sin),
                v.reshape(T, Hkv, D).contiguous())

    def fused(qkv, cos, sin):
        return ops.qkv_rope(qkv, cos, sin, H, Hkv)

    q, k, v = _run(benchmark, fused if path == "fused" else separate, qkv, cos, sin, device=device,
                   shape=f"qkv[{T},{(H + 2 * Hkv) * D}]", dtype=dtype, nbytes=nbytes)

    assert q.shape == (T, H, D) and k.shape == v.shape == (T, Hkv, D) and v.is_contiguous()
    t = 1234
    row = qkv[t].double().cpu().reshape(H + 2 * Hkv, D)
    c, s = angle[t, : D // 2].cos(), angle[t, : D // 2].sin()
    x1, x2 = row[:, : D // 2], row[:, D // 2:]
    want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(q[t].double().cpu(), want[:H], atol=tol, rtol=tol)
    torch.testing.assert_close(k[t].double().cpu(), want[H:H + Hkv], atol=tol, rtol=tol)
    assert torch.equal(v[t].double().cpu(), row[H + Hkv:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("corpus_kind", ["fp32", "int8"])
@pytest.mark.parametrize("Q", [1, 16])
def test_bench_topk_search(benchmark, device, corpus_kind, Q):
    N, d, k = 50_000, 256, 10
    corpus = F.normalize(_randn(N, d, seed=7, device=device), dim=-1)
    queries = F.normalize(_randn(Q, d, seed=8 + Q, device=device), dim=-1)
    scale = None
    if corpus_kind == "int8":
        corpus, scale = quantize_int8_rows(corpus)
    q = queries.to(compute_dtype(corpus.dtype))  # rounded once, as the index does before the search
    nbytes = N * d * corpus.element_size() + (N * 4 if scale is not None else 0) + q.numel() * q.element_size()

    topk = select_topk("auto", device)  # as an Index picks it: the reference on the CPU, the custom op on CUDA
    keys = _run(benchmark, topk, q, corpus, k, scale, DEFAULT_CHUNK_ROWS, device=device,
                shape=f"queries[{Q},{d}] corpus[{N},{d}] k={k}", dtype=corpus.dtype, nbytes=nbytes)

    scores, rows = unpack_keys(keys)
    assert keys.shape == (Q, k) and keys.dtype == torch.int64
    assert scores.dtype == torch.float32 and rows.dtype == torch.int64
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    full = q.double() @ corpus.double().T
    if scale is not None:
        full = full * scale.double()[None]
    want = full.topk(k, dim=1)
    # random unit vectors have no near-ties at the top, so the rows must match exactly
    torch.testing.assert_close(scores.double().cpu(), want.values.cpu(), atol=2e-5, rtol=0)
    assert torch.equal(rows.cpu(), want.indices.cpu())
