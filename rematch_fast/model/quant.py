"""Weight formats of the linear layers: the one seam every quantization preset goes through.

`quantize_linears(model, preset)` replaces every linear layer of the model (decoder, vision
tower, patch embedding, patch merger; fused q/k/v and gate/up keep their parts) by the preset's
module, one layer at a time, so the full-precision copy of a layer is freed as soon as its
quantized one exists. The fast backend quantizes on the host and then moves the model, so the
device never holds the full-precision weights. Presets:

- "bf16": the weights stay in the model's own dtype (nothing is replaced).
- "int8-weight": weight-only int8, symmetric, one scale per output channel (absmax / 127).
  Activations stay in the model's dtype and are never quantized, so outlier activation
  channels pass exactly; only the weights' rounding remains (at most half a step per weight).
  The matmul is `torch._weight_int8pack_mm` on the CPU (see `int8_weight_mm` for its rule);
  elsewhere the torch reference (`int8_weight_mm_torch`: widen the weights, then matmul) until
  a GPU benchmark picks a kernel.

- "fp8": e4m3 weights with one scale per output channel, activations rounded to e4m3 at run
  time with one scale per token (dynamic). `torch._scaled_mm` on GPUs of compute capability
  8.9+ (Hopper, Ada); elsewhere the torch reference (`fp8_mm_torch`), which runs anywhere,
  slowly: it is there to check the preset, not to serve with.

bnb-int8 and bnb-nf4 are planned: asking for them is an InputError that says so.
"""
from __future__ import annotations

import abc

import torch
from torch import nn

from ..errors import InputError
from .layers import FusedLinear

PRESETS = ("bf16", "int8-weight", "fp8")
PLANNED = ("bnb-int8", "bnb-nf4")


def check_preset(preset: str | None) -> str:
    """The preset, validated ("bf16" for None)."""
    preset = preset or "bf16"
    if preset in PLANNED:
        raise InputError(f"quantize preset {preset!r} is not available yet; available: {PRESETS}")
    if preset not in PRESETS:
        raise InputError(f"unknown quantize preset {preset!r}; choose from {PRESETS}")
    return preset


def int8_weight_mm_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference: x [M, K] @ (weight [N, K] int8 * scale [N]).T, in x's dtype."""
    return x @ (weight.to(x.dtype) * scale.to(x.dtype)[:, None]).T


def int8_weight_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dispatch: torch's packed int8 kernel on the CPU for fp32 and fp16 activations, and for
    bf16 when K is a multiple of 16 (torch 2.13's bf16 kernel crashes the process otherwise);
    the reference everywhere else."""
    if x.device.type == "cpu" and (x.dtype in (torch.float32, torch.float16)
                                   or x.dtype == torch.bfloat16 and x.shape[-1] % 16 == 0):
        return torch._weight_int8pack_mm(x.contiguous(), weight, scale.to(x.dtype))
    return int8_weight_mm_torch(x, weight, scale)


class QuantizedLinear(nn.Module, abc.ABC):
    """A linear layer with quantized weights and one fp32 scale per output channel. A fused
    projection keeps its `parts` (and `split`), its rows each with their own scale. Subclasses
    say how weights are stored (`quantize`) and multiplied (`matmul`)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 parts: dict[str, int] | None = None):
        super().__init__()
        self.register_buffer("weight", weight)  # [N, K], the format's dtype
        self.register_buffer("scale", scale)  # [N] fp32
        # a parameter, in the model's dtype like the others (the loader casts parameters)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.parts = parts

    @staticmethod
    @abc.abstractmethod
    def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 weights [N, K] -> (stored weights, fp32 scale per row)."""

    @abc.abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ W.T [M, N] in x's dtype, from the stored weights and scales."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        q, scale = cls.quantize(linear.weight.detach().float())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale, bias, getattr(linear, "parts", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(list(self.parts.values()), dim=-1)

    rows = FusedLinear.rows


class Int8WeightLinear(QuantizedLinear):
    """int8 weights, symmetric per output channel; activations untouched."""

    @staticmethod
    def quantize(w):
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale

    def matmul(self, x):
        return int8_weight_mm(x, self.weight, self.scale)


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def fp8_mm_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference of the fp8 matmul: x rounded to e4m3 with one scale per row (token), times
    the e4m3 weights with theirs, accumulated in fp32; the result in x's dtype."""
    xq, xs = fp8_rows(x)
    return ((xq.float() * xs[:, None]) @ (weight.float() * scale[:, None]).T).to(x.dtype)


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as e4m3 with an fp32 scale per row (absmax / 448)."""
    xs = x.float().abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    return (x.float() / xs[:, None]).to(torch.float8_e4m3fn), xs


def fp8_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dispatch: torch._scaled_mm (fp8 tensor cores, row-wise scales) on CUDA devices of compute
    capability 8.9 and newer when K and N are multiples of 16; the reference elsewhere (so that
    the preset runs, slowly, on any device: for tests and checks, not for speed)."""
    k, n = x.shape[-1], weight.shape[0]
    if x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9) and k % 16 == 0 and n % 16 == 0:
        xq, xs = fp8_rows(x)
        # row-wise scales: torch's kernel writes bf16 only; cast after
        return torch._scaled_mm(xq, weight.T, scale_a=xs[:, None], scale_b=scale[None, :].float(),
                                out_dtype=torch.bfloat16).to(x.dtype)
    return fp8_mm_torch(x, weight, scale)


class Fp8Linear(QuantizedLinear):
    """e4m3 weights with a scale per output channel, activations e4m3 with a scale per token
    computed at run time (Hopper's fp8 tensor cores)."""

    @staticmethod
    def quantize(w):
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
        return (w / scale[:, None]).to(torch.float8_e4m3fn), scale

    def matmul(self, x):
        return fp8_mm(x, self.weight, self.scale)


LAYERS = {"int8-weight": Int8WeightLinear, "fp8": Fp8Linear}


def quantize_linears(model: nn.Module, preset: str | None) -> int:
    """Replace every linear layer of `model` in place by `preset`'s module; returns how many."""
    preset = check_preset(preset)
    if preset == "bf16":
        return 0
    # the LM head is never run as a layer: matching reads two of its rows (QwenVL.output_rows)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LAYERS[preset].from_linear(linear))  # the old weights go with the old module
    return len(targets)


# -- footprint: refuse a model that cannot fit, before loading it -------------------------------
ACTIVATION_TOKENS = 8192  # the default token budget of a batch (the scheduler's batch_tokens)
WORKSPACE = 512 * 2**20  # kernels' workspace, the CUDA context's own allocations, fragmentation


def weight_bytes(cfg, dtype: torch.dtype, preset: str | None) -> int:
    """Bytes of the model's weights under `preset` (the model built on the meta device: nothing
    is allocated)."""
    from ..ops import TORCH_OPS
    from .loader import QwenVL

    preset = check_preset(preset)
    with torch.device("meta"):
        model = QwenVL(cfg, TORCH_OPS)
    size = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            linear = isinstance(module, nn.Linear) and name != "lm_head" and pname == "weight"
            if linear and preset in LAYERS:
                total += p.numel() + 4 * p.shape[0]  # a byte per weight and an fp32 scale per row
            else:
                total += p.numel() * size
    return total


def footprint(cfg, dtype: torch.dtype, preset: str | None) -> int:
    """What serving needs on a device: the weights, a full batch's largest activations (the MLP's
    gate/up output and its product, the residual stream) and a fixed workspace."""
    size = torch.empty(0, dtype=dtype).element_size()
    t = cfg.text
    activations = ACTIVATION_TOKENS * (3 * t.intermediate_size + 4 * t.hidden_size) * size
    return weight_bytes(cfg, dtype, preset) + activations + WORKSPACE


def check_fits(cfg, dtype: torch.dtype, preset: str | None, free: int, where: str) -> None:
    """An InputError, naming the presets that would fit, when the model's footprint is more than
    `free` bytes: better refused at load than out of memory halfway through a corpus."""
    need = footprint(cfg, dtype, preset)
    if need <= free:
        return
    fits = [p for p in PRESETS if footprint(cfg, dtype, p) <= free]
    hint = f"quantize={fits[0]!r} fits" if fits else "no preset fits; use a larger device"
    raise InputError(f"the model needs about {need / 2**30:.1f} GiB on {where} (weights, a batch of "
                     f"{ACTIVATION_TOKENS} tokens, workspace), {free / 2**30:.1f} GiB is free: {hint}")
