"""Triton's CPU interpreter with fp32 -> bf16 casts rounded to nearest even, as a GPU rounds them
(the interpreter truncates: about half of all values land one bf16 step toward zero)."""
import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter


def round_bf16_like_a_gpu(monkeypatch) -> None:
    """Patch the interpreter's casts (stores into bf16 tensors and .to(tl.bfloat16) alike), then check
    that the patch applies: a change in Triton's internals fails here instead of testing the truncation."""
    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = np.array(src.data, dtype=np.float32)  # a writable copy of any shape, 0-d included
            rounded = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(rounded.reshape(values.shape), dst_type.scalar)
        return truncating(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    stored = torch.empty(1000, dtype=torch.bfloat16)
    _store[(1,)](x, stored, 1000, BLOCK=1024)
    assert torch.equal(stored, x.bfloat16()), "the interpreter's bf16 rounding patch no longer applies"


@triton.jit
def _store(src, dst, n, BLOCK: tl.constexpr):  # fp32 stored into a bf16 tensor: the cast under test
    offsets = tl.arange(0, BLOCK)
    tl.store(dst + offsets, tl.load(src + offsets, mask=offsets < n), mask=offsets < n)
