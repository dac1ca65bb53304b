"""Host <-> device copies that never make the host wait for the device's queued work.

A plain `tensor.to("cuda")` from ordinary (pageable) host memory, or `.cpu()` of a device
tensor, synchronizes the stream: the host waits until every kernel queued before it has run.
In a pipeline that keeps batches queued on the device while it builds the next one, each
such copy drains the queue and the device idles until the host catches up. Here:

- `to_device` packs a batch's host tensors into one pinned buffer and sends it in one
  non-blocking copy (the caching host allocator keeps the buffer until the copy is done);
- `HostCopy` starts a device result's copy into pinned host memory right after the kernels
  that make it, and waits for that copy alone (a CUDA event) when the result is read.

On any other device both are plain copies (nothing is queued there).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

ALIGN = 16  # bytes: every packed tensor starts aligned for any dtype's view


def pack(tensors: Sequence[torch.Tensor], pin: bool) -> tuple[torch.Tensor, list[tuple]]:
    """Host tensors into one uint8 buffer (pinned if `pin`): (buffer, the slot of each)."""
    slots, end = [], 0
    for t in tensors:
        slots.append((end, t.dtype, tuple(t.shape)))
        end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    buffer = torch.empty(end, dtype=torch.uint8, pin_memory=pin)
    for t, view in zip(tensors, unpack(buffer, slots)):
        view.copy_(t)
    return buffer, slots


def unpack(buffer: torch.Tensor, slots: list[tuple]) -> list[torch.Tensor]:
    """The tensors of `pack`'s slots, as views of `buffer` (on whichever device it is)."""
    out = []
    for start, dtype, shape in slots:
        size = math.prod(shape) * dtype.itemsize
        out.append(buffer[start:start + size].view(dtype).view(shape))
    return out


def to_device(tensors: Sequence[torch.Tensor], device: torch.device | str | None) -> list[torch.Tensor]:
    """`tensors` on `device` (None: the CPU). On CUDA the host ones cross together in one
    non-blocking copy from pinned memory (views of one device buffer come back); those already
    there are kept as they are."""
    device = torch.device("cpu" if device is None else device)
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    host = [i for i, t in enumerate(tensors) if t.device.type == "cpu"]
    out = list(tensors)
    if host:
        buffer, slots = pack([tensors[i] for i in host], pin=True)
        for i, t in zip(host, unpack(buffer.to(device, non_blocking=True), slots)):
            out[i] = t
    return [t if t.device == device else t.to(device) for t in out]  # another device's tensors: a plain copy


class HostCopy:
    """Device tensors on their way to the host: the copies start now, `wait()` returns them."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.event = None
        devices = {t.device for t in tensors}
        if len(devices) > 1:  # one event marks the copies of one device's stream
            raise ValueError(f"HostCopy takes tensors of one device, got {sorted(map(str, devices))}")
        if not any(t.is_cuda for t in tensors):
            self.tensors = list(tensors)
            return
        self.tensors = []
        for t in tensors:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self.tensors.append(host)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(devices.pop()))

    def wait(self) -> list[torch.Tensor]:
        """The host tensors, once their copies are done (waits for them, not for later work)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.tensors
