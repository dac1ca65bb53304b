"""The model ops and the one rule that dispatches them.

Each op (learnable-token pooling, RMSNorm and the residual add fused before it, SwiGLU gate,
alone and in the gate/up GEMM's epilogue, rotary embedding alone and fused with the q/k/v split,
the cascade attention merge) is a
`torch.library` custom op `rematch_fast::<op>` with three parts: its torch reference
(the `*_torch` function here, also the op's default implementation), a Triton kernel
registered for CUDA (from `rematch_fast.kernels`, imported on first use), and a fake
that gives shapes to torch.compile and export.

The rule: kernels or references are chosen once, when a model or an index is built,
by `select_ops(kernels, device)`, never per call:

    kernels="torch"  the torch references, on every device (the reference backend's oracle)
    kernels="auto"   the custom ops on CUDA: their Triton kernels, called directly in eager
                     mode (no dispatcher round trip per call) and through the custom ops
                     under torch.compile (eager_on_cuda); the torch references on any
                     other device. The decoder's gate/up projection stays a cuBLAS GEMM,
                     followed by the gate kernel
    kernels="auto+swiglu-gemm"  the same, with the gate in the gate/up GEMM's epilogue (one
                     Triton GEMM, kernels/swiglu_gemm.py; models only). Opt-in: on an H200
                     it measured slower than cuBLAS plus the gate kernel (bench_embed.py's
                     fast-swiglu and MLP rows)

An `Ops` instance may also be passed where `kernels` is taken, e.g. `triton_ops()`,
which calls the Triton kernels directly (the CPU tests run them in Triton's interpreter).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import InputError

KERNEL_CHOICES = ("auto", "torch")  # what an index takes
MODEL_KERNEL_CHOICES = (*KERNEL_CHOICES, "auto+swiglu-gemm")  # what a model takes


_CUDA_IMPLS: dict = {}  # custom op -> its CUDA implementation (what eager_on_cuda calls directly)


def define_op(name: str, reference: Callable, fake: Callable, cuda: Callable):
    """The custom op rematch_fast::<name>: `reference` (annotated, so that torch infers the schema)
    runs on every device but CUDA, where `cuda` runs; `fake` gives the output shapes."""
    op = torch.library.custom_op(f"rematch_fast::{name}", reference, mutates_args=())
    op.register_kernel("cuda")(cuda)
    op.register_fake(fake)
    _CUDA_IMPLS[op] = cuda
    return op


def eager_on_cuda(op) -> Callable:
    """`op` as a model built with kernels="auto" calls it: on CUDA tensors in eager mode, its CUDA
    implementation (the Triton kernel) straight away, without the dispatcher's round trip (host time
    on every call: measured on this project's 2-core CPU, 2.4 ms of the 19 ms a forward of a tiny
    36-layer decoder takes through the custom ops); under torch.compile the custom op itself
    (its fake gives the tracer the shapes); on any other device the custom op (its reference)."""
    cuda = _CUDA_IMPLS[op]

    def call(*args):
        if args[0].is_cuda and not torch.compiler.is_compiling():
            return cuda(*args)
        return op(*args)

    return call


def triton_kernel(module: str, function: str) -> Callable:
    """A kernel of rematch_fast.kernels, imported on its first call (only CUDA calls reach it)."""
    def call(*args):
        kernel = getattr(importlib.import_module(f"{__package__}.kernels.{module}"), function)
        with torch.cuda.device(args[0].device):  # Triton launches on the current device, not the tensors'
            return kernel(*args)

    return call


# -- learnable-token pooling ---------------------------------------------------
def pool_learnable_torch(hidden: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, d], rows [B, K] (row indices of the K learnable tokens of each sequence)
    -> (unit [B, d] fp32, norm [B] fp32): E* = mean of the K rows = unit * norm."""
    pooled = hidden[rows].float().mean(dim=1)  # [B, K, d] -> [B, d]
    norm = pooled.norm(dim=-1)
    return pooled / norm.clamp_min(1e-12)[:, None], norm


pool_learnable_op = define_op(
    "pool_learnable", pool_learnable_torch,
    lambda hidden, rows: (hidden.new_empty((rows.shape[0], hidden.shape[1]), dtype=torch.float32),
                          hidden.new_empty((rows.shape[0],), dtype=torch.float32)),
    triton_kernel("pooling", "pool_learnable_triton"))


def learnable_rows_packed(cu_seqlens: torch.Tensor, K: int) -> torch.Tensor:
    """The last K rows of each sequence of a packed batch: [B, K] indices into [T, d]."""
    return cu_seqlens[1:, None].long() - K + torch.arange(K, device=cu_seqlens.device)


def learnable_rows_padded(lengths: torch.Tensor, S: int, K: int) -> torch.Tensor:
    """The last K real rows of each right-padded sequence of [B, S, d], as indices into [B*S, d]."""
    B = lengths.shape[0]
    start = torch.arange(B, device=lengths.device) * S + lengths.long() - K
    return start[:, None] + torch.arange(K, device=lengths.device)


# -- the decoder's elementwise steps ---------------------------------------------
# Each is several torch kernels and fp32 intermediates; on CUDA one Triton pass each.
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm over the last dimension: statistics in fp32, result in x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


rms_norm_op = define_op(
    "rms_norm", rms_norm_torch,
    lambda x, weight, eps: torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype)),
    triton_kernel("rms_norm", "rms_norm_triton"))


def add_rms_norm_torch(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add, then the next RMSNorm: (x + delta in x's dtype, rms_norm of that sum)."""
    s = x + delta
    return s, rms_norm_torch(s, weight, eps)


add_rms_norm_op = define_op(
    "add_rms_norm", add_rms_norm_torch,
    lambda x, delta, weight, eps: (torch.empty_like(x),
                                   torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))),
    triton_kernel("rms_norm", "add_rms_norm_triton"))


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: [N, 2I] (gate columns, then up) -> silu(gate) * up [N, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


silu_mul_op = define_op(
    "silu_mul", silu_mul_torch,
    lambda gate_up: gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2)),
    triton_kernel("silu_mul", "silu_mul_triton"))


def swiglu_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The gate/up projection and SwiGLU's gate: x [..., D], weight [2I, D] (gate rows, then up rows),
    bias [2I] or None -> silu(x Wg^T + bg) * (x Wu^T + bu) [..., I]: the GEMM, then silu_mul_torch."""
    return silu_mul_torch(F.linear(x, weight, bias))


swiglu_gemm_op = define_op(
    "swiglu_gemm", swiglu_torch,
    lambda x, weight, bias: x.new_empty((*x.shape[:-1], weight.shape[0] // 2)),
    triton_kernel("swiglu_gemm", "swiglu_gemm_triton"))


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x [T, H, D], cos/sin [T, D] fp32; rotation in fp32, result in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


rope_op = define_op(
    "rope", rope_torch,
    lambda x, cos, sin: torch.empty(x.shape, dtype=x.dtype, device=x.device),
    triton_kernel("rope", "rope_triton"))


def qkv_rope_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                   kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """After the fused q/k/v projection: qkv [T, (heads + 2 kv_heads) * D] -> q [T, heads, D] and
    k [T, kv_heads, D] rotated (rope_torch), v [T, kv_heads, D] in dense rows (the varlen kernels' layout)."""
    T = qkv.shape[0]
    D = qkv.shape[1] // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    return (rope_torch(q.reshape(T, heads, D), cos, sin), rope_torch(k.reshape(T, kv_heads, D), cos, sin),
            v.reshape(T, kv_heads, D).clone(memory_format=torch.contiguous_format))  # a copy: never a view of qkv


def _qkv_rope_fake(qkv, cos, sin, heads, kv_heads):
    T, D = qkv.shape[0], qkv.shape[1] // (heads + 2 * kv_heads)
    return (qkv.new_empty((T, heads, D)), qkv.new_empty((T, kv_heads, D)), qkv.new_empty((T, kv_heads, D)))


qkv_rope_op = define_op("qkv_rope", qkv_rope_torch, _qkv_rope_fake, triton_kernel("rope", "qkv_rope_triton"))


# -- cascade attention: merging two partial results ---------------------------------
def merge_state_torch(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                      lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over two disjoint key sets from the two partial results: o [T, H, D] (o_a's
    dtype) and lse [T, H] fp32, all log-sum-exps in natural log with the scale included."""
    la, lb = lse_a.float(), lse_b.float()
    m = torch.maximum(la, lb)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)  # both parts empty: weights 0
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    o = (wa[..., None] * o_a.float() + wb[..., None] * o_b.float()) / total.clamp_min(1e-30)[..., None]
    return o.to(o_a.dtype), m + torch.log(total)


merge_state_op = define_op(
    "merge_state", merge_state_torch,
    lambda o_a, lse_a, o_b, lse_b: (torch.empty(o_a.shape, dtype=o_a.dtype, device=o_a.device),
                                    lse_a.new_empty(lse_a.shape, dtype=torch.float32)),
    triton_kernel("merge_state", "merge_state_triton"))


# -- choosing once -----------------------------------------------------------------
@dataclass(frozen=True)
class Ops:
    """The op implementations one model (or index) was built with."""

    name: str
    pool_learnable: Callable  # (hidden [T, d], rows [B, K]) -> (unit [B, d], norm [B]), fp32
    rms_norm: Callable  # (x [..., D], weight [D], eps) -> [..., D]
    silu_mul: Callable  # (gate_up [N, 2I]) -> [N, I]
    rope: Callable  # (x [T, H, D], cos [T, D], sin [T, D]) -> [T, H, D]
    merge_state: Callable  # (o_a, lse_a, o_b, lse_b) -> (o [T, H, D], lse [T, H]): cascade attention
    add_rms_norm: Callable  # (x [..., D], delta [..., D], weight [D], eps) -> (x + delta, its rms_norm)
    qkv_rope: Callable  # (qkv [T, (H + 2 Hkv) * D], cos, sin, H, Hkv) -> (q, k rotated, v), dense [T, h, D]
    # (x [..., D], gate/up weight [2I, D], bias [2I] | None) -> silu(gate) * up [..., I], the gate in the
    # GEMM's epilogue; None: the gate/up projection runs as its module (the library GEMM), then silu_mul
    swiglu_gemm: Callable | None = None


TORCH_OPS = Ops("torch", pool_learnable_torch, rms_norm_torch, silu_mul_torch, rope_torch, merge_state_torch,
                add_rms_norm_torch, qkv_rope_torch)
CUSTOM_OPS = Ops("custom", *map(eager_on_cuda, (pool_learnable_op, rms_norm_op, silu_mul_op, rope_op, merge_state_op,
                                                add_rms_norm_op, qkv_rope_op)))
# the same with the gate in the gate/up GEMM's epilogue (kernels="auto+swiglu-gemm"; opt-in: measured slower)
SWIGLU_GEMM_OPS = replace(CUSTOM_OPS, name="custom+swiglu-gemm", swiglu_gemm=eager_on_cuda(swiglu_gemm_op))


def triton_ops() -> Ops:
    """The Triton kernels called directly, on any device (needs Triton; on the CPU, its interpreter)."""
    from .kernels.pooling import pool_learnable_triton
    from .kernels.rms_norm import add_rms_norm_triton, rms_norm_triton
    from .kernels.rope import qkv_rope_triton, rope_triton
    from .kernels.merge_state import merge_state_triton
    from .kernels.silu_mul import silu_mul_triton
    from .kernels.swiglu_gemm import swiglu_gemm_triton

    return Ops("triton", pool_learnable_triton, rms_norm_triton, silu_mul_triton, rope_triton, merge_state_triton,
               add_rms_norm_triton, qkv_rope_triton, swiglu_gemm_triton)


def check_kernels(kernels: str | Ops, choices: tuple[str, ...] = KERNEL_CHOICES) -> None:
    if not isinstance(kernels, Ops) and kernels not in choices:
        raise InputError(f"kernels must be one of {choices}, got {kernels!r}")


def select_ops(kernels: str | Ops, device: torch.device | str) -> Ops:
    """The op set for a model on `device` (see the module docstring for the rule)."""
    check_kernels(kernels, MODEL_KERNEL_CHOICES)
    if isinstance(kernels, Ops):
        return kernels
    if kernels != "torch" and torch.device(device).type == "cuda":
        return SWIGLU_GEMM_OPS if kernels == "auto+swiglu-gemm" else CUSTOM_OPS
    return TORCH_OPS
