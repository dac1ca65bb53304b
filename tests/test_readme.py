"""The README's Python examples run as written (on the CPU, with a tiny checkpoint standing in
for "path/to/checkpoint"): a user's first copy-paste must not raise."""
import re
from pathlib import Path

import torch

from conftest import random_image

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tiny_paths, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    random_image(120, 90, 1).save(tmp_path / "photo.jpg")
    scope = {"pil_image": random_image(64, 48, 2)}
    if any('"exported/"' in b for b in blocks):  # the export section opens what `rematch-fast export onnx` wrote
        from rematch_fast.export.exporter import export_onnx

        export_onnx(tiny_paths["qwen2.5-vl"], tmp_path / "exported")
    for block in blocks:
        code = block.replace("path/to/checkpoint", str(tiny_paths["qwen2.5-vl"]))
        if not torch.cuda.is_available():
            code = code.replace('device="cuda"', 'device="cpu"')
        code = code.replace('make_tiny_checkpoint("tiny"', f'make_tiny_checkpoint("{tmp_path / "tiny"}"')
        exec(compile(code, "README.md", "exec"), scope)
    assert scope["index"].ids_of(scope["rows"])[0][0] in ("a", "b", "c")
