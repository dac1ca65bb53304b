"""`export_onnx`: a checkpoint -> an export folder (the graphs of rematch_fast.export.onnx, the
checkpoint's host-side files and an `export.json` manifest), built beside and moved into place."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import InputError
from ..folders import check_replaceable, staged_folder
from .lint import tensorrt_problems
from .onnx import (
    FORMAT_VERSION,
    GRAPHS,
    HOST_FILES,
    MANIFEST,
    OPSET,
    EmbedGraph,
    MatchGraph,
    PrefillGraph,
    VisionGraph,
    dense_inputs,
    vision_inputs,
)
from .smoothquant import ALPHA, CALIBRATION_TEXTS, activation_ranges, quantize_qdq, smooth
from .weight_only import quantize_weight_only

PRECISIONS = ("fp32", "fp16")  # fp16: weights and activations; norms, rotary, softmax in fp32
# int8 presets. int8-dynamic: every MatMul's weights int8 per output channel, activations
# quantized per tensor at run time (integer ops: ONNX Runtime only, never TensorRT). int8-qdq:
# SmoothQuant scaling, then static symmetric Q/DQ calibrated on texts (export/smoothquant.py):
# the int8 graph TensorRT builds. int8-weight: 8-bit weight-only MatMulNBits, activations fp32
# (export/weight_only.py; ONNX Runtime only). The presets quantize the decoder's graphs;
# vision.onnx stays fp32 (calibration corpora are texts).
QUANTIZE_PRESETS = ("int8-dynamic", "int8-weight", "int8-qdq")
QUANTIZED_GRAPHS = ("embed", "match", "prefill", "match_prefix")
# (width, height): two frames of different sizes (tracing needs two of each dynamic size; the
# tiny models' 56-pixel windows cut them into several windows, the published 112-pixel ones do not)
EXAMPLE_IMAGES = ((56, 84), (112, 84))


def export_onnx(checkpoint: str | Path, out: str | Path, precision: str = "fp32", overwrite: bool = False,
                progress=None, quantize: str | None = None, calibration: list[str] | None = None) -> Path:
    """Export `checkpoint` to the folder `out` (refused if it holds anything, unless `overwrite`
    and it is an earlier export). `quantize`: an int8 preset (QUANTIZE_PRESETS) applied to the
    fp32 graphs; `calibration`: the texts int8-qdq calibrates on (default: a small built-in set).
    Returns the folder."""
    from .. import __version__
    from ..api import ReMatch
    from ..model.vision import vision_inverse_frequencies

    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not exported yet; choose from {PRECISIONS}")
    if quantize is not None and quantize not in QUANTIZE_PRESETS:
        raise InputError(f"quantize preset {quantize!r} is not available yet; choose from {QUANTIZE_PRESETS}")
    if quantize is not None and precision != "fp32":
        raise InputError(f"the int8 presets quantize fp32 graphs: drop --precision {precision} or --quantize")
    out = Path(out)
    check_replaceable(out, MANIFEST, overwrite, "an export folder")
    say = progress or (lambda msg: None)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    model = ReMatch.from_pretrained(checkpoint, backend="fast", kernels="torch", dtype=dtype)  # CPU, torch ops
    net, pre = model.backend.model, model.preprocessor
    modules = {"vision": VisionGraph(net), "embed": EmbedGraph(net), "match": MatchGraph(net, pre.answer_ids),
               "prefill": PrefillGraph(net), "match_prefix": MatchGraph(net, pre.answer_ids)}
    feeds = {}
    if quantize == "int8-qdq":
        texts = list(calibration or CALIBRATION_TEXTS)
        say(f"calibrating on {len(texts)} texts (SmoothQuant alpha {ALPHA})")
        prepared = [model.prepare(t) for t in texts]
        feeds = _decoder_feeds(model, [pre.embed_sequence(p, side, model.head.tokens(side))
                                       for side in ("query", "document") for p in prepared], prepared[0], prepared)
        smooth(net.decoder, activation_ranges(net.decoder, [(modules[n], feeds[n]) for n in ("embed", "match")]))
    # example inputs, after any smoothing (the prefix keys are the exported model's own)
    docs = [model.prepare(t) for t in ("an example document", "a second, somewhat longer example document to export")]
    examples = {n: f[0] for n, f in _decoder_feeds(
        model, [pre.embed_sequence(d, "document", model.head.doc_tokens) for d in docs],
        model.prepare("an example query"), [model.prepare("yes"), docs[1]], batch=len(docs)).items()}
    images = [model.prepare({"image": _example_image(w, h, seed)}) for seed, (w, h) in enumerate(EXAMPLE_IMAGES)]
    vcfg = model.backend.cfg.vision
    examples["vision"] = vision_inputs(torch.cat([i.pixel_values for i in images]), [list(i.grid_thw) for i in images],
                                       vcfg, vision_inverse_frequencies(vcfg))
    exported = {n: GRAPHS[n] for n in GRAPHS if n in examples}  # the prefix graphs need a query-first template
    with staged_folder(out, MANIFEST, overwrite, "an export folder") as staging:
        for name, spec in exported.items():
            say(f"exporting {spec.file}")
            _trace(modules[name], spec, examples[name], staging)
        for name in [n for n in QUANTIZED_GRAPHS if n in exported] if quantize else ():
            spec = GRAPHS[name]
            say(f"quantizing {spec.file} ({quantize})")
            if quantize == "int8-dynamic":
                _quantize_in_place(staging, spec.file, _quantize_dynamic)
            elif quantize == "int8-weight":
                _quantize_in_place(staging, spec.file, quantize_weight_only)
            else:
                _quantize_in_place(staging, spec.file, lambda src, dst, name=name: quantize_qdq(src, dst, feeds[name]))
        golden = _save_golden(staging, examples, say)
        lint = {name: tensorrt_problems(staging / spec.file) for name, spec in exported.items()}
        for name, problems in lint.items():
            if problems:
                say(f"{name}.onnx would not build with TensorRT: {'; '.join(problems)}")
        for f in HOST_FILES:
            if (Path(checkpoint) / f).is_file():
                shutil.copy2(Path(checkpoint) / f, staging / f)
        manifest = {
            "format_version": FORMAT_VERSION, "precision": "int8" if quantize else precision, "quantize": quantize,
            "calibration": {"texts": len(calibration or CALIBRATION_TEXTS), "smoothquant_alpha": ALPHA}
            if quantize == "int8-qdq" else None,
            "opset": OPSET,
            "source": {"checkpoint": str(Path(checkpoint).resolve()), "fingerprint": model.checkpoint.fingerprint},
            "answer_ids": list(pre.answer_ids),
            "graphs": {n: {"file": s.file, "inputs": {k: {str(a): d for a, d in s.inputs[k].items()}
                                                      for k in s.inputs_of(examples[n])},
                           "outputs": list(s.outputs), "tolerance": s.tolerance,
                           "precision": "int8" if quantize and n in QUANTIZED_GRAPHS else precision,
                           "quantize": quantize if n in QUANTIZED_GRAPHS else None}
                       for n, s in exported.items()},
            "tensorrt_lint": lint,  # what TensorRT's parser would refuse, per graph (rematch_fast.export.lint)
            "golden": golden,  # polygraphy-format inputs and ONNX Runtime outputs per graph, or why not
            "versions": {"rematch_fast": __version__, "torch": torch.__version__, "onnx": _version("onnx")},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _example_image(width: int, height: int, seed: int):
    """A deterministic image to trace the vision graph with: a colour gradient with noise."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    noise = np.random.default_rng(seed).integers(0, 55, (height, width, 3))
    return Image.fromarray((base + noise).astype(np.uint8))


def _trace(graph, spec, example: dict, folder: Path) -> None:
    """torch's dynamo exporter on `graph` at the example inputs, every declared axis dynamic."""
    names = spec.inputs_of(example)
    args = tuple(torch.from_numpy(example[k]) for k in names)
    dims = {}  # one torch Dim per axis name, shared by every input that has it
    shapes = {k: {a: dims.setdefault(n, torch.export.Dim(n)) for a, n in spec.inputs[k].items()} for k in names}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # axes of one name share one Dim: the exporter says so for each, which is noise here
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares")
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch's exporter internals
        torch.onnx.export(graph.eval(), args, str(folder / spec.file), dynamo=True, opset_version=OPSET,
                          input_names=names, output_names=list(spec.outputs),
                          dynamic_shapes=tuple(shapes[k] for k in names), verbose=False)


def _save_golden(folder: Path, feeds: dict[str, dict], say) -> dict:
    """Each graph's example inputs and its ONNX Runtime outputs, in polygraphy's JSON formats
    (golden/GRAPH_inputs.json, golden/GRAPH_outputs.json): `polygraphy run --load-inputs
    --load-outputs` checks an engine built from the graph against them on any machine."""
    try:
        import onnxruntime as ort
        from polygraphy.comparator import RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.json import save_json
        from polygraphy.logger import G_LOGGER
    except ImportError as e:
        say(f"no golden outputs: {e} (pip install 'rematch_fast[onnx]')")
        return {"written": False, "why": f"missing package: {e.name}"}
    (folder / "golden").mkdir()
    severity, G_LOGGER.module_severity = G_LOGGER.module_severity, G_LOGGER.ERROR  # it announces every save
    try:
        for name, feed in feeds.items():
            spec = GRAPHS[name]
            session = ort.InferenceSession(str(folder / spec.file), providers=["CPUExecutionProvider"])
            outputs = dict(zip(spec.outputs, session.run(None, feed)))
            save_json([feed], str(folder / "golden" / f"{name}_inputs.json"))
            results = RunResults()
            results.append(("onnxrt-export", [IterationResult(outputs=outputs, runner_name="onnxrt-export")]))
            results.save(str(folder / "golden" / f"{name}_outputs.json"))
    finally:
        G_LOGGER.module_severity = severity
    return {"written": True, "files": sorted(f"golden/{p.name}" for p in (folder / "golden").iterdir())}


def _decoder_feeds(model, embed: list, query, docs: list, batch: int = 8) -> dict[str, list[dict]]:
    """Inputs (numpy, in batches) of each decoder graph: `embed` (Sequences) for embed.onnx, the
    `query` (a PreparedItem) matched against every one of `docs` for match.onnx and, with a
    query-first template, its prefix for prefill.onnx and the docs continuing it, with the
    prefix's keys and values from the torch graph, for match_prefix.onnx."""
    from ..model.decoder import inverse_frequencies

    pre, cfg = model.preprocessor, model.backend.cfg.text
    inv_freq = inverse_frequencies(cfg)
    def inputs(seqs, name):
        return dense_inputs(seqs, name, pre.pad_id, model.dim, inv_freq, cfg.mrope_section)

    seqs = {"embed": embed, "match": [pre.match_sequence(query, d) for d in docs]}
    if model.config.query_first:
        prefix, next_pos = pre.match_prefix(query)
        # prefill: the query's prefix and every doc's as a query (a batch, for calibration's range)
        seqs["prefill"] = [prefix] + [pre.match_prefix(d)[0] for d in docs]
        seqs["match_prefix"] = [pre.match_suffix(d, next_pos) for d in docs]
    feeds = {name: [inputs(s[i: i + batch], name) for i in range(0, len(s), batch)] for name, s in seqs.items()}
    if "prefill" in feeds:  # the candidates continue the query's prefix alone (unpadded)
        with torch.no_grad():
            keys, values = PrefillGraph(model.backend.model)(*(torch.from_numpy(v) for v in inputs([prefix], "prefill").values()))
        for feed in feeds["match_prefix"]:
            feed.update(prefix_keys=keys[:, 0].numpy(), prefix_values=values[:, 0].numpy())
    return feeds


def _quantize_in_place(folder: Path, file: str, write) -> None:
    """Replace a graph and its external weights by what `write(src, dst)` makes of them."""
    import logging

    tmp = (folder / ".quantized").resolve()
    tmp.mkdir()
    root = logging.getLogger()  # ORT's quantizers log their pre-processing advice there
    level, cwd = root.level, os.getcwd()
    root.setLevel(max(level, logging.ERROR))
    try:
        # onnx refuses to write external data when a file of that name exists in the *working*
        # folder (it checks the relative location there): work from the empty temporary folder
        os.chdir(tmp)
        try:
            write((folder / file).resolve(), tmp / file)
        finally:
            os.chdir(cwd)
        for f in (file, file + ".data"):
            (folder / f).unlink(missing_ok=True)
            if (tmp / f).exists():
                (tmp / f).rename(folder / f)
    finally:
        root.setLevel(level)
        shutil.rmtree(tmp)


def _quantize_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], use_external_data_format=True)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
