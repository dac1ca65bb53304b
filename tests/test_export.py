"""ONNX export (rematch-fast export onnx) and backend="onnx": parity with the reference model at
shapes unlike the export's, the export folder's contents and rules, and a corrupted export
caught by the same comparison."""
import json
import shutil

import numpy as np
import onnx  # noqa: F401 - the test extra installs it: missing, this file fails rather than skips
import pytest
import torch

from conftest import random_image
from rematch_fast import CheckpointError, InputError, Item, ReMatch
from rematch_fast.cli import EXIT_ERROR, EXIT_OK, main
from rematch_fast.export.onnx import GRAPHS

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
def test_matching_equals_the_reference(models, exports, arch, query_view, doc_view):
    ref, onnx_model = models[arch], ReMatch.from_pretrained(exports[arch], backend="onnx")
    docs = _texts(seed=11, n=6)
    query = "which river photo"
    got = onnx_model.score(query, docs, query_view, doc_view, batch_size=4)
    assert got.path == "full"  # the export has no prefix graph yet
    torch.testing.assert_close(got.p_yes, ref.match(query, docs, query_view, doc_view), atol=TOL, rtol=0)


def test_the_export_folder(exports, tiny_paths):
    folder = exports["qwen2-vl"]
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["opset"] == 20
    assert set(manifest["graphs"]) == {"embed", "match"} and all((folder / g["file"]).is_file()
                                                                 for g in manifest["graphs"].values())
    assert manifest["graphs"]["embed"]["inputs"]["input_ids"] == {"0": "batch", "1": "seq"}
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
    onnx_model = ReMatch.from_pretrained(exports["qwen2-vl"], backend="onnx")
    with pytest.raises(InputError, match="takes no images"):
        onnx_model.embed([Item(text="x", image=random_image(40, 40, seed=1))])


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


def test_a_corrupted_export_fails_the_comparison(models, exports, tmp_path):
    """One weight of the embedding graph perturbed: the parity comparison the tests rely on sees it."""
    from onnx import numpy_helper

    folder = tmp_path / "bad"
    shutil.copytree(exports["qwen2-vl"], folder)
    graph = onnx.load(str(folder / "embed.onnx"))  # with its external weights
    (init,) = [t for t in graph.graph.initializer if "layers.0" in t.name and "o_proj" in t.name]
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    (folder / "embed.onnx").unlink()
    (folder / "embed.onnx.data").unlink()
    onnx.save(graph, str(folder / "embed.onnx"), save_as_external_data=True, location="embed.onnx.data")
    texts = _texts(seed=5, n=4)
    got = ReMatch.from_pretrained(folder, backend="onnx").encode(texts)
    assert (got.unit - models["qwen2-vl"].encode(texts).unit).abs().max() > TOL
