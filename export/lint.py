"""What TensorRT's ONNX parser would refuse, found without TensorRT: run on every exported graph.

Checks: the opset (the parser reads up to 20), operators outside the standard ONNX domain,
integer and dynamic-quantization operators (TensorRT rejects them; its int8 path is explicit
Q/DQ), and Q/DQ zero points (TensorRT needs symmetric quantization: zero points 0). It does not
hold TensorRT's full operator table: a graph that passes may still meet an unsupported
attribute in a real build (`polygraphy run --trt` is the final word).
"""
from __future__ import annotations

from pathlib import Path

MAX_OPSET = 20
REFUSED_OPS = {  # integer arithmetic and dynamic quantization: not in TensorRT's parser
    "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QLinearAdd",
    "QLinearMul", "DynamicQuantizeMatMul",
}


def tensorrt_problems(path: str | Path) -> list[str]:
    """Every reason TensorRT's parser would refuse the graph at `path` ([] when none is found)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    problems = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > MAX_OPSET:
            problems.append(f"opset {imp.version} > {MAX_OPSET}")
    inits = {t.name: t for t in model.graph.initializer}
    for node in _nodes(model.graph):
        where = f"{node.op_type} {node.name!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: operator of domain {node.domain!r}")
        if node.op_type in REFUSED_OPS:
            problems.append(f"{where}: integer or dynamic-quantization operator")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zero = inits.get(node.input[2])
            if zero is None or numpy_helper.to_array(zero).any():
                problems.append(f"{where}: zero point not 0 (TensorRT needs symmetric Q/DQ)")
    return problems


def _nodes(graph):
    """Every node, those of subgraphs (If, Loop, Scan) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(sub)
