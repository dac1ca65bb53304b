"""The int8-qdq preset: SmoothQuant scaling, then static symmetric Q/DQ calibrated on texts.

Trained LLMs carry a few hidden channels far larger than the rest; one int8 scale per
activation tensor then crushes every other channel. SmoothQuant moves that range into the
weights: for each linear layer fed by an RMSNorm (q/k/v, gate/up), channel j of the norm's
weight is divided by s_j and input column j of the linear's weight multiplied by s_j, which
leaves the fp32 model unchanged and evens out the activations. s_j = max|X_j|^alpha /
max|W_j|^(1 - alpha), with max|X_j| measured on the calibration texts (alpha 0.5, the paper's
default). The smoothed model is exported, then ONNX Runtime's static quantizer writes explicit
QuantizeLinear/DequantizeLinear pairs: weights int8 per output channel, activations int8 per
tensor, every zero point 0 (the only int8 form TensorRT builds).
"""
from __future__ import annotations

from pathlib import Path

import torch

ALPHA = 0.5


@torch.no_grad()
def activation_ranges(decoder, runs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer: max |x| of each input channel of q/k/v and of gate/up, over every
    calibration batch. `runs`: (graph, feeds) pairs, graphs over `decoder`, feeds numpy inputs."""
    ranges = [[torch.zeros(layer.qkv_proj.in_features), torch.zeros(layer.mlp.gate_up_proj.in_features)]
              for layer in decoder.layers]
    hooks = []
    for i, layer in enumerate(decoder.layers):
        for j, module in enumerate((layer.qkv_proj, layer.mlp.gate_up_proj)):
            def record(_, args, i=i, j=j):
                ranges[i][j] = torch.maximum(ranges[i][j], args[0].detach().abs().amax(dim=0).float())
            hooks.append(module.register_forward_pre_hook(record))
    try:
        for graph, feeds in runs:
            for feed in feeds:
                graph(*(torch.from_numpy(feed[k]) for k in feed))
    finally:
        for h in hooks:
            h.remove()
    return [(a, b) for a, b in ranges]


@torch.no_grad()
def smooth(decoder, ranges, alpha: float = ALPHA) -> None:
    """Fold the SmoothQuant scales into the decoder's norms and linear layers, in place."""
    for layer, (attn_in, mlp_in) in zip(decoder.layers, ranges):
        for norm, linear, amax in ((layer.input_layernorm, layer.qkv_proj, attn_in),
                                   (layer.post_attention_layernorm, layer.mlp.gate_up_proj, mlp_in)):
            w_amax = linear.weight.abs().amax(dim=0).float()
            s = (amax.clamp_min(1e-5) ** alpha / w_amax.clamp_min(1e-5) ** (1 - alpha)).clamp(1e-3, 1e3)
            norm.weight.div_(s.to(norm.weight.dtype))
            linear.weight.mul_(s.to(linear.weight.dtype))


def quantize_qdq(src: Path, dst: Path, feeds: list[dict]) -> None:
    """Static symmetric Q/DQ of every MatMul of the graph `src`, calibrated on `feeds`, to `dst`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter(feeds)

        def get_next(self):
            return next(self.left, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Gemm"],
                    use_external_data_format=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


CALIBRATION_TEXTS = [  # when the user gives no --calibration corpus: everyday sentences of varied length
    "the train to the coast leaves at nine", "a bowl of soup and fresh bread", "photos from the summer festival",
    "how do solar panels store energy", "the museum opens a new wing for modern art", "a cat asleep on a warm roof",
    "minutes of the council meeting on road repairs and the new school building", "winter tyres for small cars",
    "a guide to the birds of the northern lakes", "the river flooded the lower town last spring",
    "results of the chess tournament", "a recipe for lentil curry with rice", "the history of printing",
    "mountain huts along the long trail", "an interview with the new head of the hospital", "a quiet morning",
]
