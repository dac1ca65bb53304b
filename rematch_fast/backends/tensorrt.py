"""backend="tensorrt": the engines `rematch-fast export tensorrt` built from an export folder,
run with TensorRT's Python API on an NVIDIA GPU.

The host side is GraphBackend's (rematch_fast.backends.graphs), as for backend="onnx". Each
graph's engine gets one execution context. A call checks every input against the engine's
optimization profile first (a size outside it is an InputError naming the axis and the
`--profile` to rebuild with), binds the inputs as device tensors of the engine's dtypes,
allocates the outputs at the shapes the engine infers, and runs on torch's current stream.
Outputs come back to the host between graphs (the host code is numpy): simple, not the fastest.

**Not yet run against a real TensorRT**: none could be installed where this was written. The
binding logic (`EngineRunner`) is tested against a fake `tensorrt` module whose engines run the
ONNX graphs with ONNX Runtime, on the CPU.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..errors import CheckpointError, InputError, MissingPackageError
from ..export.onnx import GRAPHS
from .graphs import GraphBackend

ENGINE_DEVICE = "cuda"  # where TensorRT runs engines (the tests' fake runs them on the CPU)


def _tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise MissingPackageError("backend 'tensorrt' needs TensorRT's Python package (pip install tensorrt) "
                                  "and an NVIDIA GPU") from None
    return tensorrt


class EngineRunner:
    """One engine and its execution context: feeds in, outputs out."""

    def __init__(self, trt, engine, name: str, device: torch.device):
        self.trt, self.engine, self.name, self.device = trt, engine, name, device
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]
        self.dtypes = {n: self._torch_dtype(engine.get_tensor_dtype(n)) for n in names}

    def _torch_dtype(self, dtype) -> torch.dtype:
        t = self.trt.DataType
        table = {t.FLOAT: torch.float32, t.HALF: torch.float16, t.INT32: torch.int32, t.INT64: torch.int64,
                 t.BOOL: torch.bool, t.INT8: torch.int8}
        if dtype not in table:
            raise CheckpointError(f"{self.name}: engine tensor type {dtype} is not one this backend binds")
        return table[dtype]

    def check(self, feed: dict[str, np.ndarray]) -> None:
        """Every input present and inside the engine's optimization profile."""
        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise InputError(f"{self.name}: inputs {missing} are missing")
        for n in self.inputs:
            lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0))
            shape = feed[n].shape
            for axis, (a, b, v) in enumerate(zip(lo, hi, shape)):
                if not a <= v <= b:
                    raise InputError(f"{self.name}: input {n} has size {v} on axis {axis}, outside the engine's "
                                     f"profile {a}..{b}: rebuild the engines with a wider --profile")

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check(feed)
        keep = []  # device tensors stay alive until the engine has run
        for n in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device, self.dtypes[n]).contiguous()
            self.context.set_input_shape(n, tuple(t.shape))
            # an empty input (no soft rows) still gets a real address: never bind a null pointer
            bound = t if t.numel() else torch.empty(1, dtype=t.dtype, device=self.device)
            self.context.set_tensor_address(n, bound.data_ptr())
            keep.append(bound)
        outputs = {}
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            outputs[n] = torch.empty(shape, dtype=self.dtypes[n], device=self.device)
            self.context.set_tensor_address(n, outputs[n].data_ptr())
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        if not self.context.execute_async_v3(stream.cuda_stream if stream is not None else 0):
            raise RuntimeError(f"TensorRT could not run the {self.name} engine")
        if stream is not None:
            stream.synchronize()
        return {n: t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for n, t in outputs.items()}


def load_runners(folder, precision: str, cache_dir, device: torch.device, trt) -> dict[str, EngineRunner]:
    """The engines `export tensorrt` recorded for `precision`, deserialized, one runner each."""
    from pathlib import Path

    from ..export.tensorrt import ENGINES_INDEX, export_digest

    cache = Path(cache_dir) if cache_dir else Path(folder) / "tensorrt"
    index_file = cache / ENGINES_INDEX
    entry = json.loads(index_file.read_text()).get(precision) if index_file.is_file() else None
    build = f"run rematch-fast export tensorrt {folder} --precision {precision}"
    if not entry:
        raise CheckpointError(f"no {precision} engines in {cache}: {build} first")
    if entry.get("export") != export_digest(folder):
        raise CheckpointError(f"the {precision} engines in {cache} were built from another export: {build} again")
    index = entry["engines"]
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    runners = {}
    for graph, file in index.items():
        path = cache / file
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: build the engines again (rematch-fast export tensorrt)")
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise CheckpointError(f"TensorRT could not load {path} (built by another TensorRT version or GPU?): "
                                  "build the engines again")
        runners[graph] = EngineRunner(trt, engine, graph, device)
    return runners


class TensorRTBackend(GraphBackend):
    name = "tensorrt"

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, precision: str = "fp16",
                 cache_dir: str | None = None):
        """precision: which of the built engines to run (fp32, fp16 or int8); cache_dir: where
        `export tensorrt --cache-dir` put them (default: the export folder's tensorrt/)."""
        if device.type != ENGINE_DEVICE:
            raise InputError("backend 'tensorrt' runs TensorRT engines on an NVIDIA GPU: use device='cuda'")
        trt = _tensorrt()
        super().__init__(ckpt, device, dtype)
        self.runners = load_runners(ckpt.path, precision, cache_dir, device, trt)
        missing = [g for g in self.graphs if g not in self.runners]
        if missing:
            raise CheckpointError(f"no engines for {missing}: build the engines again (rematch-fast export tensorrt)")

    def _execute(self, graph: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.runners[graph].run(feed)
        return [out[n] for n in GRAPHS[graph].outputs]
