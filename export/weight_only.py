"""The int8-weight preset: 8-bit weight-only matmuls for ONNX Runtime on the CPU.

Every linear layer's weights are stored as int8 in blocks of BLOCK_SIZE input values along
each output channel, each block with its own fp32 scale (symmetric: zero point 0), in ONNX
Runtime's `MatMulNBits` operator (com.microsoft domain, bits = 8). Activations stay fp32: the
weights are widened as they are read. Nothing is calibrated, so the preset needs no corpus and
keeps outlier activation channels exactly; only the weights' own rounding error remains.

torch's exporter writes linear layers as `Gemm` (weights [N, K], transB = 1); `MatMulNBits`
replaces `MatMul` only, so each such Gemm is first rewritten as MatMul (+ Add for a bias) with
its weights transposed to [K, N]. A contrib operator: ONNX Runtime runs it, TensorRT does not
(the lint says so).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

BITS = 8
BLOCK_SIZE = 32  # input values per scale


def gemms_as_matmuls(model) -> int:
    """Rewrite, in place, each Gemm of `model` (an onnx ModelProto) whose weights are an
    initializer, with alpha = beta = 1 and transA = 0, as MatMul (+ Add for a bias). Returns how
    many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in weights or not plain:
            nodes.append(node)
            continue
        name = f"{node.input[1]}.kn" if attrs.get("transB", 0) else node.input[1]
        if name not in weights:  # once per weight, however many Gemms share it
            w = numpy_helper.to_array(weights[node.input[1]])
            weights[name] = numpy_helper.from_array(np.ascontiguousarray(w.T), name)  # [K, N]
            graph.initializer.append(weights[name])
        has_bias = len(node.input) > 2 and node.input[2]
        out = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [out], name=f"{node.name}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
        rewritten += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]  # the [N, K] originals go
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    return rewritten


def quantize_weight_only(src: Path, dst: Path) -> None:
    """The graph `src` with every linear layer as an 8-bit weight-only MatMulNBits, to `dst`
    (weights as external data)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    if not gemms_as_matmuls(model):
        raise ValueError(f"{src} has no linear layer to quantize")
    quantizer = MatMulNBitsQuantizer(model, bits=BITS, block_size=BLOCK_SIZE, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
