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

- "bnb-int8": bitsandbytes' LLM.int8: int8 weights per output channel (its `SCB` absmax); at
  run time activations are int8 per token, except the input columns holding a value of magnitude 6.0 or more,
  which are multiplied in fp16 against their widened weight columns (outliers kept).
- "bnb-nf4": bitsandbytes' 4-bit NormalFloat: blocks of 64 weights, each with an absmax that is
  itself quantized to 8 bits in blocks of 256 ("double quant"); widened to the activations'
  dtype for the matmul. Both need the optional `bitsandbytes` package (extra "bnb") and run
  through its own kernels; `bnb_int8_mm_torch` and `nf4_widen_torch` are their references.

Every format says what it stores (`layout`), so a model can be built as shells on the meta
device for a pre-quantized checkpoint and its footprint counted without quantizing anything.
"""
from __future__ import annotations

import abc
import math

import torch
from torch import nn

from ..config import QUANTIZE_PRESETS as PRESETS
from ..errors import InputError
from .layers import FusedLinear


def check_preset(preset: str | None) -> str:
    """The preset, validated ("bf16" for None); a bitsandbytes preset needs the package."""
    preset = preset or "bf16"
    if preset not in PRESETS:
        raise InputError(f"unknown quantize preset {preset!r}; choose from {PRESETS}")
    if preset.startswith("bnb-"):
        bitsandbytes()
    return preset


def bitsandbytes():
    """The bitsandbytes module, or an InputError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise InputError(f"the bnb-* presets need bitsandbytes: pip install 'rematch-fast[bnb]' ({e})") from None
    return bitsandbytes


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
    """A linear layer with quantized weights, stored as the buffers its format's `layout` names.
    A fused projection keeps its `parts` (and `split`). Subclasses say what they store (`layout`),
    how (`quantize`) and how they multiply (`matmul`)."""

    def __init__(self, stored: dict[str, torch.Tensor], bias: torch.Tensor | None, in_features: int,
                 out_features: int, parts: dict[str, int] | None = None):
        super().__init__()
        for name, tensor in stored.items():
            self.register_buffer(name, tensor)
        # a parameter, in the model's dtype like the others (the loader casts parameters)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = in_features, out_features
        self.parts = parts

    @staticmethod
    @abc.abstractmethod
    def layout(n: int, k: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor stored for weights [n, k]."""

    @staticmethod
    @abc.abstractmethod
    def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
        """fp32 weights [N, K] -> the stored tensors, as `layout` says."""

    @abc.abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ W.T [M, N] in x's dtype, from the stored tensors."""

    @classmethod
    def stored_bytes(cls, n: int, k: int) -> int:
        return sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size() for shape, dt in cls.layout(n, k).values())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        """The layer quantized; from a meta layer, a shell of the layout (for a pre-quantized
        checkpoint's weights to fill)."""
        n, k = linear.weight.shape
        if linear.weight.is_meta:
            stored = {name: torch.empty(shape, dtype=dt, device="meta") for name, (shape, dt) in cls.layout(n, k).items()}
        else:
            stored = cls.quantize(linear.weight.detach().float())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(stored, bias, k, n, getattr(linear, "parts", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(list(self.parts.values()), dim=-1)

    rows = FusedLinear.rows


def _per_row(stored: torch.dtype):
    """The layout of weights stored as `stored` with one fp32 scale per output channel."""
    return staticmethod(lambda n, k: {"weight": ((n, k), stored), "scale": ((n,), torch.float32)})


class Int8WeightLinear(QuantizedLinear):
    """int8 weights, symmetric per output channel; activations untouched."""

    layout = _per_row(torch.int8)

    @staticmethod
    def quantize(w):
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        return {"weight": torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), "scale": scale}

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

    layout = _per_row(torch.float8_e4m3fn)

    @staticmethod
    def quantize(w):
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
        return {"weight": (w / scale[:, None]).to(torch.float8_e4m3fn), "scale": scale}

    def matmul(self, x):
        return fp8_mm(x, self.weight, self.scale)


# -- bitsandbytes ------------------------------------------------------------------------------
BNB_THRESHOLD = 6.0  # LLM.int8: input columns holding a value of this magnitude or more are multiplied in fp16


def bnb_int8_mm_torch(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor,
                      threshold: float = BNB_THRESHOLD) -> torch.Tensor:
    """The reference of LLM.int8, in fp32: x rounded to fp16; its values of magnitude >= threshold
    are outliers, and their columns are multiplied as they are against the widened weight
    columns; every other column is rounded to int8 per row (scale: the row's absmax without the
    outlier values, / 127) and multiplied exactly against the int8 weights. Rounded to fp16 where
    bitsandbytes rounds: the widened weights, each part, and their sum."""
    half = torch.float16
    xh = x.to(half).float()
    spikes = xh.abs() >= threshold
    columns = spikes.any(dim=0)
    row = xh.masked_fill(spikes, 0).abs().amax(dim=1, keepdim=True)
    xq = torch.round(xh * 127 / row.clamp_min(1e-30)).masked_fill(columns, 0)  # an all-zero row stays zero
    out = ((xq @ weight.float().T) * (row / 127) * (absmax.float() / 127)).to(half).float()
    wide = (weight[:, columns].float() * (absmax.float() / 127)[:, None]).to(half).float()
    spiky = (xh[:, columns] @ wide.T).to(half).float()
    return (out + spiky).to(half).to(x.dtype)


class BnbInt8Linear(QuantizedLinear):
    """bitsandbytes' LLM.int8: int8 weights with their per-row absmax (bitsandbytes' `SCB`);
    activations int8 per token with the outlier columns in fp16, through its own ops."""

    @staticmethod
    def layout(n, k):
        return {"weight": ((n, k), torch.int8), "absmax": ((n,), torch.float32)}

    @staticmethod
    def quantize(w):
        weight, absmax, _ = bitsandbytes().functional.int8_vectorwise_quant(w.to(torch.float16))
        return {"weight": weight, "absmax": absmax}

    def matmul(self, x):
        ops = torch.ops.bitsandbytes
        xh = x.to(torch.float16)
        xq, row, outliers = ops.int8_vectorwise_quant(xh, BNB_THRESHOLD)
        out, _ = ops.int8_mixed_scaled_mm(xh, xq, self.weight, row, self.absmax, outliers, None)
        return out.to(x.dtype)


NF4_BLOCK, NF4_ABSMAX_BLOCK = 64, 256  # weights per absmax; absmaxes per second-level absmax


def nf4_widen_torch(layer: BnbNf4Linear) -> torch.Tensor:
    """The reference of the nf4 format: the layer's weights [N, K] in fp32, from its stored
    tensors (two 4-bit codes a byte, high nibble first; double-quantized absmaxes)."""
    n, k = layer.out_features, layer.in_features
    codes = torch.stack([layer.weight.view(-1) >> 4, layer.weight.view(-1) & 15], dim=1).view(-1)[:n * k]
    absmax = layer.nested_code[layer.absmax.long()] * layer.nested_absmax.repeat_interleave(NF4_ABSMAX_BLOCK)[
        :layer.absmax.numel()] + layer.offset
    return (layer.code[codes.long()] * absmax.repeat_interleave(NF4_BLOCK)[:n * k]).view(n, k)


class BnbNf4Linear(QuantizedLinear):
    """bitsandbytes' nf4 with double-quantized absmaxes (its `Linear4bit` defaults with
    compress_statistics); the stored tensors are its `QuantState`'s, flattened into buffers."""

    @staticmethod
    def layout(n, k):
        blocks = -(-n * k // NF4_BLOCK)
        return {"weight": (((n * k + 1) // 2, 1), torch.uint8), "absmax": ((blocks,), torch.uint8),
                "code": ((16,), torch.float32), "offset": ((1,), torch.float32),
                "nested_absmax": ((-(-blocks // NF4_ABSMAX_BLOCK),), torch.float32),
                "nested_code": ((256,), torch.float32)}

    @staticmethod
    def quantize(w):
        weight, state = bitsandbytes().functional.quantize_4bit(
            w, blocksize=NF4_BLOCK, quant_type="nf4", compress_statistics=True)
        return {"weight": weight, "absmax": state.absmax, "code": state.code, "offset": state.offset.reshape(1),
                "nested_absmax": state.state2.absmax, "nested_code": state.state2.code}

    def quant_state(self, dtype: torch.dtype):
        """The stored tensors as bitsandbytes' QuantState (cheap: no copy)."""
        QuantState = bitsandbytes().functional.QuantState
        nested = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=NF4_ABSMAX_BLOCK,
                            dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          code=self.code, blocksize=NF4_BLOCK, quant_type="nf4", dtype=dtype,
                          offset=self.offset[0], state2=nested)

    def matmul(self, x):
        """bitsandbytes' matmul_4bit, except on the CPU when K is even but not a multiple of 64:
        there its dequantize kernel (0.50) restarts the blocks at every row, while quantize_4bit
        (and CUDA) count them over the whole tensor, so it reads the wrong absmaxes; the
        reference widening runs instead (Qwen2.5-VL's vision MLP has K = 3420, the patch
        embedding K = 1176)."""
        if x.device.type == "cpu" and self.in_features % NF4_BLOCK and self.in_features % 2 == 0:
            return x @ nf4_widen_torch(self).to(x.dtype).T
        return bitsandbytes().matmul_4bit(x, self.weight.t(), self.quant_state(x.dtype))


LAYERS = {"int8-weight": Int8WeightLinear, "fp8": Fp8Linear, "bnb-int8": BnbInt8Linear, "bnb-nf4": BnbNf4Linear}


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
                total += LAYERS[preset].stored_bytes(*p.shape)
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
