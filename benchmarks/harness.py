"""Shared benchmark plumbing: median timing, the card's measured ceilings, peak extra
memory, and results as JSONL plus a Markdown table."""
from __future__ import annotations

import gzip
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def interleaved_median_ms(fns: dict, device: torch.device, iters: int, warmup: int = 1) -> dict[str, float]:
    """Median ms of each function, timed round-robin (one call of each per round) so that a
    shared machine's drift hits every provider alike. Every call runs under inference mode:
    no provider keeps autograd state (plain transformers would, and run out of memory on 3B)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_ms(fn, device: torch.device, iters: int = 20, warmup: int = 3) -> float:
    return interleaved_median_ms({"fn": fn}, device, iters, warmup)["fn"]


@torch.inference_mode()
def peak_extra_mb(fn, device: torch.device) -> float | None:
    """Peak memory a call allocates beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


@torch.inference_mode()
def busy_fraction(fn, device: torch.device) -> float | None:
    """The fraction of one call's wall time during which some kernel runs on the device (the union
    of the kernels' intervals, so streams that overlap count once), from torch's profiler; CUDA only.
    Less than 1: the device waits on the host (launches, copies, synchronizations). Only the device
    side is recorded: recording every host operator too would add host work per operator, which
    shows as idle device time; what overhead remains makes this a lower bound."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        sync(device)
        wall_us = (time.perf_counter() - t) * 1e6
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    return union_length(spans) / wall_us


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals sorted by start; overlaps count once."""
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


@torch.inference_mode()
def profile_table(fn, device: torch.device, rows: int = 20, trace: Path | None = None) -> str:
    """One call of fn under torch's profiler: the operators (and, on CUDA, kernels) that took the
    most time, as text. For finding what bounds a provider, not for figures. `trace`: also write
    the timeline there, gzipped Chrome trace JSON (chrome://tracing, Perfetto): where the device
    sits idle and what the host does meanwhile."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: compiled kernels and caches are not what we look for
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    if trace is not None:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            with raw.open("rb") as src, gzip.open(trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def ceilings(device: torch.device) -> dict:
    """This card's copy bandwidth (GB/s) and dense GEMM rate (TFLOP/s), measured now."""
    big = 1 << 30 if device.type == "cuda" else 1 << 26
    a = torch.empty(big, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    copy_ms = median_ms(lambda: b.copy_(a), device, iters=10, warmup=2)
    del a, b
    n, dt = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    x = torch.randn(n, n, device=device, dtype=dt)
    y = torch.randn(n, n, device=device, dtype=dt)
    gemm_ms = median_ms(lambda: x @ y, device, iters=10, warmup=2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": name, "copy_GBps": 2 * big / copy_ms / 1e6, "gemm_TFLOPs": 2 * n**3 / gemm_ms / 1e9,
            "gemm_dtype": str(dt).replace("torch.", "")}


class Results:
    def __init__(self, out: str | Path | None, name: str):
        self.rows: list[dict] = []
        self.path = Path(out) / f"{name}.jsonl" if out else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def add(self, **row) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def markdown(self, columns: list[str]) -> str:
        def fmt(v):
            if v is None:
                return "–"
            if isinstance(v, float):
                return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
            return str(v)

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in self.rows]
        table = "\n".join(lines)
        if self.path:
            self.path.with_suffix(".md").write_text(table + "\n")
        return table
