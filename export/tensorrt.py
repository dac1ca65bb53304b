"""TensorRT engines from an export folder, built with TensorRT's Python API.

**Not yet run against a real TensorRT**: no TensorRT could be installed where this was written.
The logic around the API (optimization profiles from the graphs' dynamic axes, the timing
cache, the engine cache and its key) is unit-tested against a fake `tensorrt` module; the calls
themselves follow TensorRT 10's documented API. A user with TensorRT checks an engine with
`polygraphy run --trt` on the same graph.

Profiles: every dynamic axis of GRAPHS (batch, seq, soft, prefix; the vision graph's patches,
frames, frame_patches, windows, window_patches) gets (min, opt, max) sizes; each input's three
shapes follow from its axes and the graph's static dimensions. In an int8 export only the Q/DQ
graphs are built in int8; the vision graph, kept fp32 by the presets, is built in fp16. Engines are cached
by a key of the graph's bytes, its weights, the precision, the profile and TensorRT's version,
so a rebuild happens only when one of them changes; the timing cache is kept beside the engines
and reused across builds.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import InputError, MissingPackageError
from .onnx import GRAPHS

DEFAULT_PROFILE = {
    "batch": (1, 8, 64), "seq": (1, 256, 1024), "soft": (0, 128, 16384),  # soft: learnable + image tokens
    # a matching query's prefix (prefill.onnx computes it under `seq`'s range: queries with large
    # images need both widened, e.g. seq=1:256:8192,prefix=1:256:8192)
    "prefix": (1, 256, 1024),
    # vision, per call: all patches, whole frames and their longest, windows and their longest
    # (Qwen2.5-VL's 112-pixel windows hold at most 64 patches)
    "patches": (4, 4096, 65536), "frames": (1, 4, 64), "frame_patches": (4, 1024, 16384),
    "windows": (1, 64, 4096), "window_patches": (4, 64, 64),
}
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")  # int8 only from an int8-qdq graph (explicit Q/DQ)


def parse_profile(text: str | None) -> dict[str, tuple[int, int, int]]:
    """"batch=1:8:64,seq=1:256:1024" -> {axis: (min, opt, max)}, over DEFAULT_PROFILE."""
    profile = dict(DEFAULT_PROFILE)
    for part in filter(None, (text or "").split(",")):
        name, _, sizes = part.partition("=")
        try:
            lo, opt, hi = (int(x) for x in sizes.split(":"))
        except ValueError:
            raise InputError(f"profile {part!r}: write AXIS=MIN:OPT:MAX, e.g. seq=1:256:1024") from None
        if name.strip() not in DEFAULT_PROFILE:
            raise InputError(f"profile axis {name!r} is not one of {sorted(DEFAULT_PROFILE)}")
        if not 0 <= lo <= opt <= hi or hi < 1:
            raise InputError(f"profile {part!r}: need 0 <= MIN <= OPT <= MAX and MAX >= 1")
        profile[name.strip()] = (lo, opt, hi)
    return profile


def input_shapes(graph: str, static: dict[str, list[int]], profile: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """For each input of `graph`: its (min, opt, max) shapes. `static`: each input's shape as the
    ONNX file declares it (dynamic axes as any value, replaced here from the profile)."""
    out = {}
    for name, axes in GRAPHS[graph].inputs.items():
        if name not in static:  # an optional input this architecture's graph does not take
            continue
        shapes = []
        for which in range(3):
            shapes.append(tuple(profile[axes[a]][which] if a in axes else int(d) for a, d in enumerate(static[name])))
        out[name] = tuple(shapes)
    return out


def static_shapes(onnx_path: Path) -> dict[str, list[int]]:
    """Each graph input's declared shape (0 where it is dynamic)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def engine_key(folder: Path, graph: str, precision: str, profile: dict, trt_version: str) -> str:
    """What an engine depends on: the graph and its weights, precision, profile, TensorRT."""
    digest = hashlib.sha256()
    for f in (f"{graph}.onnx", f"{graph}.onnx.data"):
        if (folder / f).is_file():
            with (folder / f).open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    digest.update(json.dumps([precision, sorted(profile.items()), trt_version]).encode())
    return digest.hexdigest()[:16]


def graph_precision(manifest: dict, graph: str, precision: str) -> str:
    """The precision one graph's engine is built in: int8 only for a graph the export quantized
    (explicit Q/DQ), fp16 for the others of an int8 build."""
    quantized = manifest.get("graphs", {}).get(graph, {}).get("precision") == "int8"
    return "fp16" if precision == "int8" and not quantized else precision


def build_engines(folder: str | Path, precision: str = "fp16", profile: dict | None = None,
                  cache_dir: str | Path | None = None, trt=None, log=None) -> dict[str, Path]:
    """Build (or take from the cache) one engine per graph of the export `folder`. Returns
    {graph: engine file}. `trt`: the tensorrt module (imported when None)."""
    folder = Path(folder)
    manifest = json.loads((folder / "export.json").read_text())
    if precision not in ENGINE_PRECISIONS:
        raise InputError(f"precision {precision!r}: choose from {ENGINE_PRECISIONS}")
    if precision == "int8" and manifest.get("quantize") != "int8-qdq":
        raise InputError("TensorRT's int8 path is an explicit Q/DQ graph: export with --quantize int8-qdq "
                         f"(this export: {manifest.get('quantize')!r})")
    problems = {g: p for g, p in manifest.get("tensorrt_lint", {}).items() if p}
    if problems:
        raise InputError(f"these graphs would not build with TensorRT: {problems}")
    if trt is None:
        try:
            import tensorrt as trt
        except ImportError:
            raise MissingPackageError("building engines needs TensorRT's Python package (pip install tensorrt) "
                                      "and an NVIDIA GPU") from None
    profile = profile or dict(DEFAULT_PROFILE)
    cache = Path(cache_dir) if cache_dir else folder / "tensorrt"
    cache.mkdir(parents=True, exist_ok=True)
    say = log or (lambda msg: None)
    logger = trt.Logger(trt.Logger.WARNING)
    timing_file = cache / "timing.cache"
    engines = {}
    for graph, spec in GRAPHS.items():
        if graph not in manifest.get("graphs", {}):  # the prefix graphs of a document-first template
            continue
        built = graph_precision(manifest, graph, precision)
        key = engine_key(folder, graph, built, profile, trt.__version__)
        engine_file = cache / f"{graph}-{built}-{key}.engine"
        if engine_file.is_file():
            say(f"{engine_file.name}: cached")
            engines[graph] = engine_file
            continue
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(folder / spec.file)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise InputError(f"TensorRT cannot parse {spec.file}: {errors}")
        config = builder.create_builder_config()
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in input_shapes(graph, static_shapes(folder / spec.file), profile).items():
            opt.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(opt)
        if built in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)  # layers int8 cannot take fall back to fp16, not fp32
        if built == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        timing = config.create_timing_cache(timing_file.read_bytes() if timing_file.is_file() else b"")
        config.set_timing_cache(timing, False)
        say(f"building {engine_file.name}")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT could not build {spec.file} (see its log above)")
        engine_file.write_bytes(bytes(serialized))
        timing_file.write_bytes(bytes(config.get_timing_cache().serialize()))
        engines[graph] = engine_file
    _record(cache, precision, export_digest(folder), engines)
    return engines


# in the cache folder: {precision: {"export": digest of export.json, "engines": {graph: engine file}}},
# what backend="tensorrt" opens (it refuses engines recorded for another export)
ENGINES_INDEX = "engines.json"


def export_digest(folder: Path) -> str:
    """Which export engines belong to: its manifest (which names its source's fingerprint, its
    graphs, precision and preset) is rewritten by every export."""
    return hashlib.sha256((Path(folder) / "export.json").read_bytes()).hexdigest()[:16]


def _record(cache: Path, precision: str, digest: str, engines: dict[str, Path]) -> None:
    index_file = cache / ENGINES_INDEX
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    index[precision] = {"export": digest, "engines": {graph: path.name for graph, path in engines.items()}}
    index_file.write_text(json.dumps(index, indent=2) + "\n")
