"""ONNX export (rematch-fast export onnx) and backend="onnx": parity with the reference model at
shapes unlike the export's, the export folder's contents and rules, and a corrupted export
caught by the same comparison."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx  # noqa: F401 - the test extra installs it: missing, this file fails rather than skips
import pytest
import torch
from conftest import document_first_copy, random_image, with_outlier_channels
from rematch_fast.export.onnx import GRAPHS

from rematch_fast import CheckpointError, InputError, Item, ReMatch
from rematch_fast.cli import EXIT_ERROR, EXIT_OK, main

TOL = GRAPHS["embed"].tolerance["unit"]  # fp32: 1e-4 max abs against the reference


@pytest.fixture(scope="module")
def exports(tiny_paths, tmp_path_factory):
    """Each architecture exported once through the command line."""
    out = {}
    for arch, path in tiny_paths.items():
        out[arch] = tmp_path_factory.mktemp("export") / arch
        assert main(["export", "onnx", str(path), "--out", str(out[arch]), "--quiet"]) == EXIT_OK
    return out


def _texts(seed: int, n: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = ["river", "bread", "moon", "seven", "blue", "market", "quiet", "engine", "photo"]
    return [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(k),), generator=g))
            for k in torch.randint(1, 90, (n,), generator=g)]


def test_embeddings_equal_the_reference(models, exports, arch):
    onnx_model = ReMatch.from_pretrained(exports[arch], backend="onnx")
    for n, side in [(1, "query"), (3, "document"), (7, "query")]:  # batch sizes and lengths the export never saw
        texts = _texts(seed=n, n=n)
        got, want = onnx_model.encode(texts, side=side, batch_size=4), models[arch].encode(texts, side=side)
        torch.testing.assert_close(got.unit, want.unit, atol=TOL, rtol=0)
        torch.testing.assert_close(got.norm, want.norm, atol=TOL, rtol=1e-5)


@pytest.mark.parametrize("query_view, doc_view", [("raw", "raw"), ("raw", "feat"), ("feat", "feat")])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_matching_equals_the_reference(models, exports, arch, query_view, doc_view, share_prefix):
    """Through match.onnx, and through prefill.onnx + match_prefix.onnx (the query's prefix once,
    the candidates continuing it in batches the export never saw)."""
    ref, onnx_model = models[arch], ReMatch.from_pretrained(exports[arch], backend="onnx")
    docs = _texts(seed=11, n=6)
    query = "which river photo"
    got = onnx_model.score(query, docs, query_view, doc_view, batch_size=4, share_prefix=share_prefix)
    assert got.path == ("shared-prefix" if share_prefix else "full")
    torch.testing.assert_close(got.p_yes, ref.match(query, docs, query_view, doc_view), atol=TOL, rtol=0)


def test_many_queries_share_batches_through_the_prefix_graphs(models, exports, arch):
    """Candidates of several queries (texts and an image) in one batch, each continuing its own
    query's prefix keys and values."""
    ref, onnx_model = models[arch], ReMatch.from_pretrained(exports[arch], backend="onnx")
    image = Item(text="a photo", image=random_image(150, 61, seed=3))
    requests = [("first query", _texts(seed=21, n=3)), (image, _texts(seed=22, n=2) + [image]),
                ("a third, longer query about engines and rivers", _texts(seed=23, n=4))]
    results = onnx_model.score_many(requests, batch_size=5)
    for (query, docs), got in zip(requests, results):
        assert got.path == "shared-prefix"
        torch.testing.assert_close(got.p_yes, ref.match(query, docs), atol=TOL, rtol=0)


def test_a_document_first_template_exports_no_prefix_graphs(tiny_paths, tmp_path):
    src = document_first_copy(tiny_paths["qwen2-vl"], tmp_path / "docfirst")
    out = tmp_path / "exp"
    assert main(["export", "onnx", str(src), "--out", str(out), "--quiet"]) == EXIT_OK
    assert set(json.loads((out / "export.json").read_text())["graphs"]) == {"vision", "embed", "match"}
    assert not (out / "prefill.onnx").exists()
    docs = _texts(seed=5, n=3)
    got = ReMatch.from_pretrained(out, backend="onnx").score("a query", docs)
    assert got.path == "full"
    torch.testing.assert_close(got.p_yes, ReMatch.from_pretrained(src).match("a query", docs), atol=TOL, rtol=0)


def test_fp16_graphs_pass_their_gate(models, tiny_paths, tmp_path, arch):
    """--precision fp16: fp16 weights and activations in every graph (fp32 inputs and outputs),
    within the fp16 gate (cosine >= 0.999, top-10 overlap >= 0.95) on the built-in texts and
    images, and p(yes) close through both matching paths."""
    import collections

    out = tmp_path / "fp16"
    assert main(["export", "onnx", str(tiny_paths[arch]), "--out", str(out), "--quiet", "--precision", "fp16",
                 "--parity"]) == EXIT_OK
    report, manifest = (json.loads((out / f).read_text()) for f in ("parity.json", "export.json"))
    assert manifest["precision"] == "fp16" and report["passed"] and report["images"] > 0
    assert {g["precision"] for g in manifest["graphs"].values()} == {"fp16"}
    assert report["thresholds"] == {"cosine_min": 0.999, "top10_overlap": 0.95} and 0 < report["max_abs"]
    graph = onnx.load(str(out / "embed.onnx"), load_external_data=False).graph
    weights = collections.Counter(t.data_type for t in graph.initializer if len(t.dims) == 2)
    assert weights[onnx.TensorProto.FLOAT16] >= 2 * 4  # the linear layers are fp16...
    assert all(i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for i in [*graph.input, *graph.output])
    model, docs = ReMatch.from_pretrained(out, backend="onnx"), _texts(seed=31, n=5)
    want = models[arch].match("which engine", docs)
    for share in (True, False):
        got = model.score("which engine", docs, share_prefix=share).p_yes
        torch.testing.assert_close(got, want, atol=5e-3, rtol=0)


def test_images_equal_the_reference(models, exports, arch):
    """Image counts, grids and aspect ratios the export never saw (it traced two small images),
    images with and without captions beside texts, in one batch and across batches; matching
    with images on both sides."""
    ref, onnx_model = models[arch], ReMatch.from_pretrained(exports[arch], backend="onnx")
    sizes = [(301, 47), (64, 64), (29, 211), (150, 149), (400, 120), (33, 33), (97, 333)]
    images = [random_image(w, h, seed=40 + i) for i, (w, h) in enumerate(sizes)]
    items = [Item(image=images[0]), "a text between images", Item(text="a caption", image=images[1]),
             Item(image=images[2]), Item(text="wide", image=images[4]), Item(image=images[3]),
             Item(text="tiny", image=images[5]), Item(image=images[6])]
    for batch_size in (1, 3, 8):
        got, want = onnx_model.encode(items, side="document", batch_size=batch_size), ref.encode(items, side="document")
        torch.testing.assert_close(got.unit, want.unit, atol=TOL, rtol=0)
    for query in ("which photo is wide", items[2]):
        got = onnx_model.match(query, items[3:], batch_size=2)
        torch.testing.assert_close(got, ref.match(query, items[3:]), atol=TOL, rtol=0)


def test_the_vision_graph_at_new_grids(tiny_paths, exports, arch):
    """vision.onnx alone against the torch tower: one image, many, a long thin one; for
    Qwen2.5-VL, windows cut at the image's edge."""
    import onnxruntime as ort
    from rematch_fast.export.onnx import vision_inputs

    from rematch_fast.model.vision import vision_inverse_frequencies

    fast = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", kernels="torch")
    tower, cfg = fast.backend.model.visual, fast.backend.cfg.vision
    session = ort.InferenceSession(str(exports[arch] / "vision.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    assert ("window_index" in names) == (arch == "qwen2.5-vl")
    for n, sizes in enumerate([[(230, 70)], [(56, 56), (300, 120), (90, 301)], [(112, 112)] * 4]):
        prepared = [fast.prepare({"image": random_image(w, h, seed=70 + n * 10 + i)}) for i, (w, h) in enumerate(sizes)]
        pixels, grids = torch.cat([p.pixel_values for p in prepared]), [list(p.grid_thw) for p in prepared]
        (got,) = session.run(None, vision_inputs(pixels, grids, cfg, vision_inverse_frequencies(cfg)))
        with torch.no_grad():
            want = tower(pixels, torch.tensor(grids))
        torch.testing.assert_close(torch.from_numpy(got), want, atol=GRAPHS["vision"].tolerance["features"], rtol=0)


def test_the_export_folder(exports, tiny_paths):
    folder = exports["qwen2-vl"]
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["opset"] == 20 and manifest["format_version"] == 2
    assert set(manifest["graphs"]) == {"vision", "embed", "match", "prefill", "match_prefix"}
    assert all((folder / g["file"]).is_file() for g in manifest["graphs"].values())
    assert manifest["graphs"]["match_prefix"]["inputs"]["prefix_keys"] == {"2": "prefix"}
    assert manifest["graphs"]["embed"]["inputs"]["input_ids"] == {"0": "batch", "1": "seq"}
    assert "window_index" not in manifest["graphs"]["vision"]["inputs"]  # Qwen2-VL attends over whole frames
    windows = json.loads((exports["qwen2.5-vl"] / "export.json").read_text())["graphs"]["vision"]["inputs"]
    assert windows["window_index"] == {"0": "windows", "1": "window_patches"}
    source = ReMatch.from_pretrained(tiny_paths["qwen2-vl"])
    assert manifest["source"]["fingerprint"] == source.checkpoint.fingerprint
    # indexes built through the export and through the source checkpoint are interchangeable
    assert ReMatch.from_pretrained(folder, backend="onnx").checkpoint.fingerprint == source.checkpoint.fingerprint


def test_wrong_pairings_and_unsupported_inputs_are_clear_errors(exports, tiny_paths):
    with pytest.raises(CheckpointError, match="export folder .* open it with backend='onnx'"):
        ReMatch.from_pretrained(exports["qwen2-vl"], backend="fast")
    with pytest.raises(CheckpointError, match="runs an export folder"):
        ReMatch.from_pretrained(tiny_paths["qwen2-vl"], backend="onnx")
    with pytest.raises(CheckpointError, match="dtype=torch.float32"):
        ReMatch.from_pretrained(exports["qwen2-vl"], backend="onnx", dtype="bfloat16")


def test_overwrite_rules(exports, tmp_path, tiny_paths):
    folder = tmp_path / "exp"
    shutil.copytree(exports["qwen2-vl"], folder)
    args = ["export", "onnx", str(tiny_paths["qwen2-vl"]), "--out", str(folder), "--quiet"]
    assert main(args) == EXIT_ERROR  # exists: needs --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["export", "onnx", str(tiny_paths["qwen2-vl"]), "--out", str(other), "--quiet", "--overwrite"]) \
        == EXIT_ERROR and (other / "notes.txt").read_text() == "mine"  # not an export: never replaced


def _corrupt(src, dst, graph_name="embed", weight=("layers.0", "o_proj")):
    """A copy of an export with one weight of a graph perturbed (by default embed.onnx's first o_proj)."""
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    file = f"{graph_name}.onnx"
    graph = onnx.load(str(dst / file))  # with its external weights
    (init,) = [t for t in graph.graph.initializer if all(w in t.name for w in weight)]
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    (dst / file).unlink()
    (dst / f"{file}.data").unlink()
    onnx.save(graph, str(dst / file), save_as_external_data=True, location=f"{file}.data")
    return dst


def test_parity_report_passes_a_good_export_and_fails_a_corrupted_one(models, exports, tmp_path, tiny_paths):
    from rematch_fast.export.parity import compare

    ref = models["qwen2-vl"]
    good = compare(ref, ReMatch.from_pretrained(exports["qwen2-vl"], backend="onnx"))
    assert good and good.rows > 0 and good.pairs > 0 and good.max_abs <= TOL and good.top10_overlap == 1.0
    bad_folder = _corrupt(exports["qwen2-vl"], tmp_path / "bad")
    bad = compare(ref, ReMatch.from_pretrained(bad_folder, backend="onnx"))
    assert not bad and any(f.startswith("max_abs") for f in bad.failures)
    # the built-in set holds images: a corrupted vision graph fails it too
    bad_vision = compare(ref, ReMatch.from_pretrained(_corrupt(exports["qwen2-vl"], tmp_path / "bad-vision", "vision",
                                                               ("blocks.0", "proj.weight")), backend="onnx"))
    assert not bad_vision and bad_vision.images > 0 and any(f.startswith("max_abs") for f in bad_vision.failures)
    text_only = compare(ref, ReMatch.from_pretrained(tmp_path / "bad-vision", backend="onnx"), items=_texts(3, 6))
    assert text_only and text_only.images == 0  # ...which texts alone never see
    nothing = compare(ref, ref, items=["only one"])
    assert not nothing and "nothing to compare" in nothing.failures[0]
    # the command line: exit 1 on failure, the report saved either way
    report = tmp_path / "report.json"
    args = ["parity", "--reference", str(tiny_paths["qwen2-vl"]), "--out", str(report)]
    assert main(args + ["--candidate", str(bad_folder)]) == EXIT_ERROR
    saved = json.loads(report.read_text())
    assert saved["passed"] is False and saved["failures"]
    assert main(args + ["--candidate", str(exports["qwen2-vl"])]) == EXIT_OK
    assert json.loads(report.read_text())["passed"] is True


def test_export_with_parity_writes_its_report(tiny_paths, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(_texts(seed=8, n=12))))
    out = tmp_path / "exp"
    assert main(["export", "onnx", str(tiny_paths["qwen2.5-vl"]), "--out", str(out), "--quiet", "--parity",
                 "--corpus", str(corpus)]) == EXIT_OK
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["rows"] == 24  # 12 texts, each as a query and as a document


def test_tensorrt_lint(exports, tmp_path):
    """The exported graphs pass; integer ops, asymmetric Q/DQ and a newer opset are named."""
    from onnx import TensorProto, helper
    from rematch_fast.export.lint import tensorrt_problems

    for arch, folder in exports.items():
        lint = json.loads((folder / "export.json").read_text())["tensorrt_lint"]
        assert lint == {g: [] for g in ("vision", "embed", "match", "prefill", "match_prefix")}
        assert tensorrt_problems(folder / "embed.onnx") == [] and tensorrt_problems(folder / "vision.onnx") == []

    def graph(nodes, inits, opset=20):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                  opset_imports=[helper.make_opsetid("", opset)])
        path = tmp_path / f"g{len(list(tmp_path.iterdir()))}.onnx"
        onnx.save(model, str(path))
        return path

    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = lambda v: helper.make_tensor("z", TensorProto.INT8, [], [v])  # noqa: E731
    qdq = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    assert tensorrt_problems(graph(qdq, [scale, zero(0)])) == []
    assert len(tensorrt_problems(graph(qdq, [scale, zero(3)]))) == 2  # both nodes: zero point not 0
    integer = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "qs", "qz"]),
               helper.make_node("MatMulInteger", ["q", "q"], ["i"]), helper.make_node("Cast", ["i"], ["y"], to=1)]
    found = tensorrt_problems(graph(integer, []))
    assert any("MatMulInteger" in p for p in found) and any("DynamicQuantizeLinear" in p for p in found)
    assert tensorrt_problems(graph([helper.make_node("Identity", ["x"], ["y"])], [], opset=21)) == ["opset 21 > 20"]


def test_int8_dynamic_passes_its_gate_and_the_gate_catches_outliers(tiny_paths, tmp_path, arch):
    """int8-dynamic keeps cosine >= 0.99 and top-10 overlap >= 0.9 on a plain model; with outlier
    channels its per-tensor activations lose ranking quality, and `export --parity` says so."""
    out = tmp_path / "q"
    assert main(["export", "onnx", str(tiny_paths[arch]), "--out", str(out), "--quiet", "--quantize", "int8-dynamic",
                 "--parity"]) == EXIT_OK
    report, manifest = (json.loads((out / f).read_text()) for f in ("parity.json", "export.json"))
    assert manifest["precision"] == "int8" and manifest["quantize"] == "int8-dynamic"
    assert report["passed"] and report["thresholds"] == {"cosine_min": 0.99, "top10_overlap": 0.9}
    assert 0 < report["max_abs"] and report["cosine_min"] < 1 - 1e-9  # really quantized
    assert any("integer" in p for p in manifest["tensorrt_lint"]["embed"])  # never offered to TensorRT
    assert not list(out.glob("*.q*")) and not (out / ".quantized").exists()  # no leftovers
    if arch == "qwen2-vl":
        spiky = with_outlier_channels(tiny_paths[arch], tmp_path / "spiky")
        out2 = tmp_path / "q2"
        assert main(["export", "onnx", str(spiky), "--out", str(out2), "--quiet", "--quantize", "int8-dynamic",
                     "--parity"]) == EXIT_ERROR
        failed = json.loads((out2 / "parity.json").read_text())
        assert not failed["passed"] and failed["failures"]


def test_int8_weight_keeps_activations_and_survives_outlier_channels(tiny_paths, tmp_path, arch, exports):
    """int8-weight: every linear layer of the decoder graphs an 8-bit MatMulNBits (activations
    fp32), its gate passed; on a model with outlier channels too (they live in the activations,
    which it leaves alone). The Gemm -> MatMul rewrite before it changes no output."""
    import collections

    import onnxruntime as ort
    from rematch_fast.export.weight_only import gemms_as_matmuls

    plain = onnx.load(str(exports[arch] / "match.onnx"))
    assert gemms_as_matmuls(plain) == 2 * 4  # two layers, four linear layers each (the LM rows are a MatMul)
    rewritten = tmp_path / "rewritten.onnx"
    onnx.save(plain, str(rewritten), save_as_external_data=True, location="rewritten.onnx.data")
    golden = json.loads((exports[arch] / "export.json").read_text())["golden"]
    assert golden["written"]
    from polygraphy.json import load_json

    feed = load_json(str(exports[arch] / "golden" / "match_inputs.json"))[0]
    before, after = (ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                     for f in (exports[arch] / "match.onnx", rewritten))
    assert abs(before - after).max() <= 1e-5
    sources = {"plain": tiny_paths[arch]}
    if arch == "qwen2-vl":
        sources["outliers"] = with_outlier_channels(tiny_paths[arch], tmp_path / "spiky")
    for name, source in sources.items():
        out = tmp_path / name
        assert main(["export", "onnx", str(source), "--out", str(out), "--quiet", "--quantize", "int8-weight",
                     "--parity"]) == EXIT_OK, name
        report, manifest = (json.loads((out / f).read_text()) for f in ("parity.json", "export.json"))
        assert report["passed"] and manifest["quantize"] == "int8-weight" and 0 < report["max_abs"]
        graph = onnx.load(str(out / "embed.onnx"), load_external_data=False).graph
        ops = collections.Counter(n.op_type for n in graph.node)
        assert ops["MatMulNBits"] == 2 * 4 and not ops["Gemm"] and not ops["MatMulInteger"]
        assert manifest["graphs"]["match_prefix"]["precision"] == "int8" == manifest["graphs"]["prefill"]["precision"]
        assert all(a.i == 8 for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits")
        assert any("com.microsoft" in p for p in manifest["tensorrt_lint"]["embed"])  # ONNX Runtime only


def test_int8_qdq_is_symmetric_qdq_and_smoothquant_saves_outlier_channels(models, tiny_paths, tmp_path, monkeypatch):
    """int8-qdq: the linear layers as explicit symmetric Q/DQ (TensorRT's lint passes), its gate
    passed on a plain model; on a model with outlier channels SmoothQuant's scaling keeps more of
    the ranking than the same quantization without it and than int8-dynamic."""
    import collections

    from rematch_fast.export import exporter
    from rematch_fast.export.parity import compare

    calibration = tmp_path / "cal.jsonl"
    calibration.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(_texts(seed=9, n=12))))
    out = tmp_path / "qdq"
    assert main(["export", "onnx", str(tiny_paths["qwen2-vl"]), "--out", str(out), "--quiet", "--quantize", "int8-qdq",
                 "--calibration", str(calibration), "--parity"]) == EXIT_OK
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["quantize"] == "int8-qdq" and manifest["calibration"]["texts"] == 12
    assert manifest["tensorrt_lint"] == {g: [] for g in ("vision", "embed", "match", "prefill", "match_prefix")}
    assert manifest["graphs"]["vision"]["precision"] == "fp32" and manifest["graphs"]["embed"]["precision"] == "int8"
    ops = collections.Counter(n.op_type for n in onnx.load(str(out / "embed.onnx"), load_external_data=False).graph.node)
    layers = 2 * 4  # two decoder layers of the tiny model, four linear layers each
    assert ops["DequantizeLinear"] >= 2 * layers and ops["QuantizeLinear"] >= layers  # weights and activations
    from rematch_fast.export import tensorrt as rt

    trt = FakeTensorRT()
    engines = rt.build_engines(out, "int8", trt=trt)  # the int8 graph TensorRT takes
    assert engines["embed"].name.startswith("embed-int8-") and engines["vision"].name.startswith("vision-fp16-")
    assert ("flag", "INT8") in trt.calls and ("flag", "FP16") in trt.calls
    spiky = with_outlier_channels(tiny_paths["qwen2-vl"], tmp_path / "spiky")
    ref = ReMatch.from_pretrained(spiky)

    def quality(name, quantize):
        exporter.export_onnx(spiky, tmp_path / name, quantize=quantize)
        return compare(ref, ReMatch.from_pretrained(tmp_path / name, backend="onnx"), precision="int8")

    smoothed, dynamic = quality("smoothed", "int8-qdq"), quality("dynamic", "int8-dynamic")
    monkeypatch.setattr(exporter, "smooth", lambda *a, **k: None)
    plain = quality("unsmoothed", "int8-qdq")
    assert smoothed.cosine_min > plain.cosine_min and smoothed.top10_overlap > plain.top10_overlap
    assert smoothed.top10_overlap > dynamic.top10_overlap


def _polygraphy_check(folder, graph: str) -> subprocess.CompletedProcess:
    """What a user with TensorRT runs (with --trt), here with ONNX Runtime as the runner."""
    tool = Path(sys.executable).parent / "polygraphy"
    golden = folder / "golden"
    return subprocess.run([str(tool), "run", str(folder / f"{graph}.onnx"), "--onnxrt",
                           "--load-inputs", str(golden / f"{graph}_inputs.json"),
                           "--load-outputs", str(golden / f"{graph}_outputs.json"), "--atol", "1e-4", "--rtol", "1e-4"],
                          capture_output=True, text=True, timeout=300)


def test_golden_outputs_check_a_runner_with_polygraphy(exports, tmp_path):
    """The golden files are polygraphy's own formats: its `run --load-outputs` passes the export
    and fails a copy with one perturbed weight."""
    folder = exports["qwen2.5-vl"]
    assert json.loads((folder / "export.json").read_text())["golden"]["written"]
    for graph in ("embed", "match"):
        run = _polygraphy_check(folder, graph)
        assert run.returncode == 0 and "PASSED" in run.stdout + run.stderr, run.stdout + run.stderr
    bad = _corrupt(folder, tmp_path / "bad")
    run = _polygraphy_check(bad, "embed")
    assert run.returncode != 0 and "FAILED" in run.stdout + run.stderr


# -- TensorRT engines, against a fake tensorrt module (no TensorRT can be installed here) -------------
class FakeTensorRT:
    """Records what build_engines asks of TensorRT's API; builds "engines" that name their graph."""
    __version__ = "10.0-fake"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class BuilderFlag:
        FP16, INT8 = "FP16", "INT8"

    def __init__(self):
        self.calls = []
        fake = self

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                fake.calls.append(("set_shape", name, lo, opt, hi))
                self.shapes[name] = [list(lo), list(opt), list(hi)]

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+"

        class Config:
            def set_flag(self, flag):
                fake.calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                fake.calls.append(("profile",))
                self.profile = profile

            def create_timing_cache(self, data):
                fake.calls.append(("timing_in", data))
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                self.network.path = path
                return True

        class Network:
            path = None

        class Builder:
            def __init__(self, logger):
                fake.calls.append(("builder",))

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):  # an "engine": its graph and profile
                return json.dumps({"onnx": network.path, "profile": config.profile.shapes}).encode()

        self.Builder, self.OnnxParser = Builder, Parser

    # the runtime: an engine runs its ONNX graph with ONNX Runtime, reading its inputs from and
    # writing its outputs to the addresses bound to it, as TensorRT would on a GPU
    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class DataType:
        FLOAT, HALF, INT32, INT64, BOOL, INT8 = 1, 10, 6, 7, 9, 3  # ONNX's element type numbers

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return FakeEngine(json.loads(data))


class FakeEngine:
    def __init__(self, built):
        import onnxruntime as ort

        self.profile = built["profile"]
        graph = onnx.load(built["onnx"], load_external_data=False).graph
        self.io = [(t.name, "input", t.type.tensor_type.elem_type) for t in graph.input]
        self.io += [(t.name, "output", t.type.tensor_type.elem_type) for t in graph.output]
        self.session = ort.InferenceSession(built["onnx"], providers=["CPUExecutionProvider"])

    num_io_tensors = property(lambda self: len(self.io))

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return {n: m for n, m, _ in self.io}[name]

    def get_tensor_dtype(self, name):
        return {n: t for n, _, t in self.io}[name]

    def get_tensor_profile_shape(self, name, index):
        return self.profile[name]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.results = engine, {}, {}, None

    def set_input_shape(self, name, shape):
        self.shapes[name], self.results = tuple(shape), None

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def _array(self, name, elem):
        import ctypes

        import numpy as np

        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        n = int(np.prod(self.shapes[name])) * np.dtype(dtype).itemsize
        raw = (ctypes.c_char * n).from_address(self.addresses[name]) if n else b""
        return np.frombuffer(bytes(raw), dtype=dtype).reshape(self.shapes[name])

    def get_tensor_shape(self, name):
        if self.results is None:  # output shapes follow from the inputs: run the graph
            feed = {n: self._array(n, t) for n, m, t in self.engine.io if m == "input"}
            outputs = [n for n, m, _ in self.engine.io if m == "output"]
            self.results = dict(zip(outputs, self.engine.session.run(outputs, feed)))
        return self.results[name].shape

    def execute_async_v3(self, stream):
        import ctypes

        for name, value in self.results.items():
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        return True


def test_tensorrt_profiles_and_engine_cache(exports, tmp_path):
    from rematch_fast.export import tensorrt as rt

    folder = tmp_path / "exp"
    shutil.copytree(exports["qwen2-vl"], folder)
    assert rt.parse_profile("seq=8:64:512")["seq"] == (8, 64, 512) and rt.parse_profile(None) == rt.DEFAULT_PROFILE
    for bad in ("seq=8:4:512", "width=1:2:3", "seq=1:2"):
        with pytest.raises(InputError):
            rt.parse_profile(bad)
    shapes = rt.input_shapes("embed", rt.static_shapes(folder / "embed.onnx"), rt.DEFAULT_PROFILE)
    d = json.loads((folder / "rematch_config.json").read_text())["hidden_size"]
    assert shapes["input_ids"] == ((1, 1), (8, 256), (64, 1024))
    assert shapes["soft_embeds"] == ((0, d), (128, d), (16384, d))
    assert shapes["pool_index"][2][0] == 64 and shapes["pool_index"][0][1] == shapes["pool_index"][2][1] > 0  # K static

    trt = FakeTensorRT()
    engines = rt.build_engines(folder, "fp16", trt=trt)
    assert set(engines) == set(GRAPHS) and json.loads(engines["embed"].read_bytes())["onnx"].endswith("embed.onnx")
    set_shapes = {c[1] for c in trt.calls if c[0] == "set_shape"}
    vision_inputs = set(GRAPHS["vision"].inputs) - GRAPHS["vision"].optional  # Qwen2-VL: no windows
    assert set_shapes == {k for g in ("embed", "match", "prefill", "match_prefix") for k in GRAPHS[g].inputs} | vision_inputs
    assert ("flag", "FP16") in trt.calls
    vision = rt.input_shapes("vision", rt.static_shapes(folder / "vision.onnx"), rt.DEFAULT_PROFILE)
    assert vision["frame_index"] == ((1, 4), (4, 1024), (64, 16384)) and vision["pixels"][2][0] == 65536
    # in an int8 build only the graphs the export quantized are int8 (vision.onnx stays fp32 in the export)
    manifest = {"graphs": {"vision": {"precision": "fp32"}, "embed": {"precision": "int8"}}}
    assert rt.graph_precision(manifest, "vision", "int8") == "fp16"
    assert rt.graph_precision(manifest, "embed", "int8") == "int8" and rt.graph_precision(manifest, "vision", "fp32") == "fp32"
    assert (folder / "tensorrt" / "timing.cache").read_bytes() == b"+" * len(GRAPHS)  # each build reuses it, then saves it
    again = FakeTensorRT()
    assert rt.build_engines(folder, "fp16", trt=again) == engines and ("builder",) not in again.calls  # cached
    other = rt.build_engines(folder, "fp16", profile=rt.parse_profile("seq=1:64:128"), trt=FakeTensorRT())
    assert other["embed"] != engines["embed"]  # another profile, another engine
    with pytest.raises(InputError, match="int8-qdq"):
        rt.build_engines(folder, "int8", trt=FakeTensorRT())


def test_backend_tensorrt_binds_engines_and_checks_their_profiles(models, exports, tmp_path, monkeypatch):
    """backend="tensorrt" end to end over fake engines that run the ONNX graphs: inputs bound at
    the engines' dtypes, outputs at the shapes they infer, results equal to the reference model
    (texts, images, both matching paths); a size outside an engine's profile is an InputError."""
    from rematch_fast.export import tensorrt as rt

    from rematch_fast.backends import tensorrt as backend

    folder = tmp_path / "exp"
    shutil.copytree(exports["qwen2.5-vl"], folder)
    fake = FakeTensorRT()
    rt.build_engines(folder, "fp16", trt=fake)
    with pytest.raises(InputError, match="NVIDIA GPU"):
        ReMatch.from_pretrained(folder, backend="tensorrt")  # on the CPU
    monkeypatch.setattr(backend, "_tensorrt", lambda: fake)
    monkeypatch.setattr(backend, "ENGINE_DEVICE", "cpu")
    with pytest.raises(CheckpointError, match="no int8 engines"):
        ReMatch.from_pretrained(folder, backend="tensorrt", precision="int8")
    model, ref = ReMatch.from_pretrained(folder, backend="tensorrt"), models["qwen2.5-vl"]
    items = _texts(seed=61, n=3) + [Item(image=random_image(130, 70, seed=62)), Item(text="c", image=random_image(60, 90, seed=63))]
    got, want = model.encode(items, side="document", batch_size=2), ref.encode(items, side="document")
    torch.testing.assert_close(got.unit, want.unit, atol=TOL, rtol=0)  # the fake's engines are the fp32 graphs
    for share in (True, False):
        result = model.score("which one", items, batch_size=3, share_prefix=share)
        assert result.path == ("shared-prefix" if share else "full")
        torch.testing.assert_close(result.p_yes, ref.match("which one", items), atol=TOL, rtol=0)
    rt.build_engines(folder, "fp32", profile=rt.parse_profile("seq=1:8:16"), trt=fake)
    narrow = ReMatch.from_pretrained(folder, backend="tensorrt", precision="fp32")
    with pytest.raises(InputError, match="input input_ids has size .* on axis 1, outside the engine's profile 1..16"):
        narrow.encode(["a text long enough to need more than sixteen tokens, with its template around it"])
    manifest = json.loads((folder / "export.json").read_text())
    manifest["versions"]["note"] = "exported again"  # another export in the same folder: its engines are stale
    (folder / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="built from another export"):
        ReMatch.from_pretrained(folder, backend="tensorrt")


def test_tensorrt_refuses_a_graph_its_lint_flagged(tiny_paths, tmp_path):
    from rematch_fast.export import tensorrt as rt

    out = tmp_path / "q"
    assert main(["export", "onnx", str(tiny_paths["qwen2-vl"]), "--out", str(out), "--quiet",
                 "--quantize", "int8-dynamic"]) == EXIT_OK
    with pytest.raises(InputError, match="would not build with TensorRT"):
        rt.build_engines(out, "fp16", trt=FakeTensorRT())


@pytest.mark.parametrize("args", [
    ["export", "onnx", "CKPT"],  # no --out
    ["export", "onnx", "CKPT", "--out", "x", "--profile", "seq=1:2:3"],
    ["export", "tensorrt", "FOLDER", "--out", "x"],
    ["export", "tensorrt", "FOLDER", "--quantize", "int8-dynamic"],
    ["export", "tensorrt", "FOLDER", "--profile", "seq=4:2:1"],
    ["export", "tensorrt", "FOLDER", "--profile", "width=1:2:3"],
    ["export", "onnx", "CKPT", "--out", "x", "--precision", "int8"],  # int8 is a --quantize preset
    ["export", "onnx", "CKPT", "--out", "x", "--precision", "fp16", "--quantize", "int8-qdq"],
])
def test_export_usage_errors_exit_2(args, capsys):
    from rematch_fast.cli import EXIT_USAGE

    assert main(args) == EXIT_USAGE and "error:" in capsys.readouterr().err


def test_building_engines_without_tensorrt_is_a_clear_error(exports, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the missing-package message cannot be checked")
    except ImportError:
        pass
    assert main(["export", "tensorrt", str(exports["qwen2-vl"])]) == EXIT_ERROR
    assert "needs TensorRT's Python package" in capsys.readouterr().err
