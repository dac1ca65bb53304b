"""SwiGLU in the gate/up GEMM's epilogue (Triton): silu(x Wg^T + bg) * (x Wu^T + bu) in one kernel.

The plain path runs the fused gate/up GEMM ([T, 2I] written to memory), then the gate kernel
(silu_mul.py: [T, 2I] read back, [T, I] written). Here each program computes one [BM, BN] tile of
the result with two accumulators, the gate's and the up projection's, over the same x tiles: rows
n of the gate and I + n of the up part of the fused weight [2I, D] (the checkpoint layout, nothing
reordered), and only [T, I] ever reaches memory. The accumulators are two dots per reduction step,
or (ONE_DOT) halves of one dot over a weight tile of both parts' columns; the autotuner picks.
Rounding follows the plain path: each projection is rounded to the input dtype (as the GEMM's output
is), silu(gate) is rounded, then the product.
The torch reference is rematch_fast.ops.swiglu_torch.

On a GPU the tile sizes are autotuned per (token count rounded up to a power of two, I, D), at the
first call of each (outside any CUDA-graph capture: the first batch of every shape runs eagerly).
Opt-in (kernels="auto+swiglu-gemm"): on an H200 it took 1.57 ms where cuBLAS plus the gate kernel took
1.22 ms (8,192 tokens, the 3B model's MLP; bench_embed.py's MLP rows).
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from ._launch import interpreting, next_pow2


@triton.jit(do_not_specialize=["M", "M_KEY"])  # one compile for every row count
def _swiglu_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, I, K, M_KEY, up_offset, stride_xm, stride_xk, stride_wn,
                        stride_wk, stride_om, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                        ONE_DOT: tl.constexpr):
    # M_KEY (M rounded up) only keys the autotuner's cache; up_offset = I * stride_wn (the up rows)
    # programs walk the tiles GROUP_M row blocks at a time, so those x rows stay in L2 across columns
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(I, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tl.cdiv(M, BM) - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok, n_ok = rm < M, rn < I
    # rows and columns past the end load row 0 (their results are never stored): no masks on M, N
    rm_in = tl.where(m_ok, rm, 0).to(tl.int64)
    rn_in = tl.where(n_ok, rn, 0).to(tl.int64)
    x_at = x_ptr + rm_in[:, None] * stride_xm + rk[None, :] * stride_xk
    if ONE_DOT:
        # the gate's BN columns, then the up projection's, as one [BK, 2 BN] tile: one dot per step
        # (two dots in one loop may pipeline worse than one twice as wide)
        c = tl.arange(0, 2 * BN)
        is_up = (c >= BN).to(tl.int64)
        cn = pid_n * BN + c % BN
        cn_in = tl.where(cn < I, cn, 0).to(tl.int64)
        w_at = w_ptr + cn_in[None, :] * stride_wn + is_up[None, :] * up_offset + rk[:, None] * stride_wk
        acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            if EVEN_K:
                a = tl.load(x_at)
                w = tl.load(w_at)
            else:
                k_ok = rk < K - k * BK
                a = tl.load(x_at, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_at, mask=k_ok[:, None], other=0.0)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
            x_at += BK * stride_xk
            w_at += BK * stride_wk
        if HAS_BIAS:
            acc += tl.load(b_ptr + cn_in + is_up * I).to(tl.float32)[None, :]
        # [BM, 2 BN] -> [BM, BN, 2] -> the gate's and the up projection's [BM, BN]
        acc_gate, acc_up = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN)), (0, 2, 1)))
    else:
        gate_at = w_ptr + rn_in[None, :] * stride_wn + rk[:, None] * stride_wk  # W^T tiles [BK, BN]
        up_at = gate_at + up_offset
        acc_gate = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            if EVEN_K:
                a = tl.load(x_at)
                g = tl.load(gate_at)
                u = tl.load(up_at)
            else:
                k_ok = rk < K - k * BK
                a = tl.load(x_at, mask=k_ok[None, :], other=0.0)
                g = tl.load(gate_at, mask=k_ok[:, None], other=0.0)
                u = tl.load(up_at, mask=k_ok[:, None], other=0.0)
            if IEEE:  # fp32 as torch computes it by default (no TF32)
                acc_gate = tl.dot(a, g, acc_gate, input_precision="ieee")
                acc_up = tl.dot(a, u, acc_up, input_precision="ieee")
            else:
                acc_gate = tl.dot(a, g, acc_gate)
                acc_up = tl.dot(a, u, acc_up)
            x_at += BK * stride_xk
            gate_at += BK * stride_wk
            up_at += BK * stride_wk
        if HAS_BIAS:
            acc_gate += tl.load(b_ptr + rn_in).to(tl.float32)[None, :]
            acc_up += tl.load(b_ptr + I + rn_in).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    tl.store(out_ptr + rm_in[:, None] * stride_om + rn[None, :], (silu * up).to(dtype),
             mask=m_ok[:, None] & n_ok[None, :])


def _configs() -> list[triton.Config]:
    """Candidates for Hopper-class GPUs: two fp32 accumulators per program, so BN is half what a
    plain GEMM would take; shared memory per stage is (BM + 2 BN) * BK * 2 bytes."""
    shapes = [  # BM, BN, BK, warps, stages, one dot of 2 BN columns (else two of BN)
        (128, 128, 64, 8, 3, False), (128, 128, 64, 8, 4, False), (128, 64, 64, 4, 4, False),
        (64, 128, 64, 4, 4, False), (256, 64, 64, 8, 3, False), (128, 128, 32, 8, 5, False),
        (64, 64, 128, 4, 3, False), (32, 64, 128, 4, 4, False), (32, 128, 64, 4, 4, False),
        (32, 64, 64, 4, 2, False),  # fits any shared memory, fp32 included
        # one dot per step: on an H200 (run D) the best two-dot tiles reached 0.64 of the GEMM rate,
        # where inductor's plain Triton GEMM of the same gate/up shape (128 x 128 x 64) reached 0.89
        (128, 128, 64, 8, 3, True), (128, 128, 64, 8, 4, True), (128, 64, 64, 4, 4, True),
        (64, 128, 64, 4, 4, True),
    ]
    return [triton.Config(dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, ONE_DOT=one), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s, one in shapes]


def shared_memory_bytes(device: torch.device) -> int:
    """The most shared memory one program may take on `device` (227 KB on Hopper, 163 KB on an A100)."""
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


def _worth_trying(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The candidates worth compiling for this call: their pipelined tiles fit the GPU's shared memory
    (fp32 ones often do not), and row tiles no taller than the rows (a 128-row tile for a
    64-row query batch is mostly padding)."""
    smem = shared_memory_bytes(named_args["x_ptr"].device)
    size, rows = named_args["x_ptr"].element_size(), named_args["M_KEY"]

    def fits(c):
        b = c.kwargs
        return (b["BM"] + 2 * b["BN"]) * b["BK"] * size * c.num_stages <= smem and b["BM"] <= max(32, rows)

    return [c for c in configs if fits(c)] or [min(configs, key=lambda c: c.kwargs["BM"] * c.num_stages)]


_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BK"] == 0})
# the winners also go to Triton's disk cache where this Triton has one: every process on a machine
# (the corpus job's workers) then runs the same tiles, so an item embeds the same on each of them
_on_disk = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_tuned = triton.autotune(configs=_configs(), key=["M_KEY", "I", "K"], **_on_disk,
                         prune_configs_by={"early_config_prune": _worth_trying})(_even_k(_swiglu_gemm_kernel))
# the CPU tests' tiles (the interpreter times nothing): small, so that awkward shapes cover every edge
INTERPRETER_CONFIG = triton.Config(dict(BM=32, BN=32, BK=32, GROUP_M=2, ONE_DOT=False))
# (rows rounded up, I, D, dtype, device) -> the tiles the autotuner chose: later calls launch the kernel
# with them directly (the autotuner's own lookup costs host time on every call)
_chosen: dict[tuple, triton.Config] = {}


def swiglu_gemm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., D], weight [2I, D] (gate rows, then up rows), bias [2I] or None
    -> silu(x Wg^T + bg) * (x Wu^T + bu) [..., I] in x's dtype."""
    D = x.shape[-1]
    I = weight.shape[0] // 2
    rows = x.reshape(-1, D)
    M = rows.shape[0]
    out = torch.empty((M, I), dtype=x.dtype, device=x.device)
    if M and I:
        if interpreting() and x.dtype == torch.bfloat16:  # the interpreter computes bf16 tl.dot wrongly
            rows, weight = rows.float(), weight.float()
        rows_key = min(next_pow2(M), 1 << 16)
        args = (rows, weight, bias if bias is not None else weight, out, M, I, D, rows_key, I * weight.stride(0),
                rows.stride(0), rows.stride(1), weight.stride(0), weight.stride(1), out.stride(0))
        flags = dict(HAS_BIAS=bias is not None, IEEE=rows.dtype == torch.float32)
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(I, meta["BN"]),)  # noqa: E731
        key = (rows_key, I, D, str(rows.dtype), str(rows.device))
        config = INTERPRETER_CONFIG if interpreting() else _chosen.get(key)
        if config is None:  # this shape's first call: the autotuner times the candidates and runs the best
            if rows.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"the swiglu GEMM's tiles for {key} are not tuned yet, and tuning cannot run "
                                   "inside a CUDA-graph capture: run this shape once eagerly first")
            _tuned[grid](*args, **flags)
            _chosen[key] = _tuned.best_config
        else:
            _swiglu_gemm_kernel[grid](*args, **flags, EVEN_K=D % config.kwargs["BK"] == 0, **config.all_kwargs())
    return out.reshape(*x.shape[:-1], I)


def tuned_configs() -> dict:
    """The tiles chosen so far: {(rows rounded up, I, D, dtype, device): config} (what a benchmark reports)."""
    return {key: str(config) for key, config in _chosen.items()}
