"""Weight-only quantization: int8 per output channel, int4 per group of input columns.

Applied from outside, after a model is built and loaded, like a parallel plan:

    model, cfg = load_model(path)
    quantize_model(model, "int8")       # every block's Linear -> QuantLinear; the lm head in int8

The weights are quantized at load time from the float checkpoint (nothing quantized is ever
stored), and activations stay in the model's dtype outside the Linears. Inside one, the input
is cast to bfloat16 for torch's CPU weight-only kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`: fast only with bf16 activations), and the output cast back.
Where those kernels do not exist (another device, a shape they refuse), the same numbers come
from a reference path that dequantizes the weights (bf16 input, float32 accumulation): correct,
not fast. Gradients flow to the input (fine-tuning with frozen weights), never to the weights.

Schemes: "int8" (symmetric, one scale per output row) and "int4" / "int4-gN" (asymmetric, a
scale and zero per group of N = 32, 64 or 128 input columns; "int4" is group 32; a width that
is not a multiple of N is padded with zero columns, and the input with zeros). The lm head
is quantized in int8 under both (the tokens' logits are the most sensitive product), and the
embedding stays as it is (a gather reads one row a token). Knows nothing of files or networks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarmlm.errors import UserError

GROUP_SIZES = (32, 64, 128)
_SCHEME = re.compile(r"^(none|int8|int4)(?:-g(\d+))?$")


@dataclass(frozen=True)
class QuantScheme:
    bits: int              # 8 or 4 (0: no quantization)
    group_size: int = 0    # int4: input columns sharing one scale and zero; int8: 0 (per output row)

    @property
    def name(self) -> str:
        """The canonical spelling announced to the swarm: "none", "int8", "int4-g32"."""
        if self.bits == 0:
            return "none"
        return "int8" if self.bits == 8 else f"int4-g{self.group_size}"


NONE = QuantScheme(0)


def parse_scheme(text: str | None) -> QuantScheme:
    """"int8" | "int4" | "int4-g64" | "none" | None -> a QuantScheme, or UserError."""
    if text is None:
        return NONE
    m = _SCHEME.match(text.strip().lower())
    if m is None or (m.group(1) != "int4" and m.group(2) is not None):
        raise UserError(f"unknown quantization {text!r} (use int8, int4 or int4-gN with N in {GROUP_SIZES})")
    kind = m.group(1)
    if kind == "none":
        return NONE
    if kind == "int8":
        return QuantScheme(8)
    group = int(m.group(2) or 32)
    if group not in GROUP_SIZES:
        raise UserError(f"int4 group size must be one of {GROUP_SIZES}, got {group}")
    return QuantScheme(4, group)


# ---- quantizing one weight matrix (pure tensor functions) -------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q (N, K) int8, scales (N,) float32) with w ~ q * scales[:, None]."""
    w = w.detach().float()
    scales = (w.abs().amax(1) / 127.0).clamp(min=1e-10)          # (N,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q (N, K) int32 in 0..15, scales (N, K/g), zeros (N, K/g)) float32, with
    w ~ (q - 8) * scale + zero per group (the layout torch's int4 kernels read)."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4 with group size {group_size} needs a width divisible by it, got {K}")
    g = w.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)                                # (N, K/g)
    scales = ((hi - lo) / 15.0).clamp(min=1e-10)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32).reshape(N, K)
    zeros = lo + 8.0 * scales
    return q, scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = q.shape
    g = (q.reshape(N, K // group_size, group_size).float() - 8.0) * scales[..., None] + zeros[..., None]
    return g.reshape(N, K)


# ---- kernels, and whether they exist here -----------------------------------------------------

_WORKS: dict[tuple, bool] = {}


def _int8_kernel_works(device: torch.device) -> bool:
    key = ("int8", device.type)
    if key not in _WORKS:
        try:
            x = torch.ones(1, 64, dtype=torch.bfloat16, device=device)
            q = torch.ones(8, 64, dtype=torch.int8, device=device)
            s = torch.ones(8, dtype=torch.bfloat16, device=device)
            _WORKS[key] = bool(torch._weight_int8pack_mm(x, q, s).shape == (1, 8))
        except (RuntimeError, NotImplementedError, AttributeError):
            _WORKS[key] = False
    return _WORKS[key]


def _pack_int4(q: torch.Tensor) -> torch.Tensor | None:
    """q (N, K) int32 on CPU -> the CPU int4 kernel's packed layout, or None where it is refused."""
    if q.device.type != "cpu" or not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
        return None
    try:
        return torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    except (RuntimeError, NotImplementedError):
        return None


# ---- the module ---------------------------------------------------------------------------------

class _QuantMatmul(torch.autograd.Function):
    """y = x @ W^T with W quantized; backward gives the input's gradient only (frozen weights)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.layer.dequantized(torch.float32)                   # (N, K)
        return (grad.float() @ w).to(grad.dtype), None


class QuantLinear(nn.Module):
    """A frozen Linear whose weight is int8 (per row) or int4 (per group); bias kept in float."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme):
        super().__init__()
        if scheme.bits not in (4, 8):
            raise ValueError(f"QuantLinear needs an int8 or int4 scheme, got {scheme}")
        w = linear.weight
        self.scheme = scheme
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.pad = 0
        if scheme.bits == 8:
            q, scales = quantize_int8(w)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", scales.to(torch.bfloat16))
            self.fast = _int8_kernel_works(w.device)
        else:
            self.pad = -self.in_features % scheme.group_size     # zero columns up to a whole group
            q, scales, zeros = quantize_int4(F.pad(w.detach(), (0, self.pad)), scheme.group_size)
            packed = _pack_int4(q)
            self.fast = packed is not None
            self.register_buffer("qweight", packed if self.fast else q.to(torch.uint8))
            # (K/g, N, 2): scale and zero per group and output row, bf16 (the kernel's layout)
            self.register_buffer("scales_zeros", torch.stack([scales.t(), zeros.t()], -1).to(torch.bfloat16)
                                 .contiguous())

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the kernels compute with, (N, K) in `dtype` (reference path, gradients)."""
        if self.scheme.bits == 8:
            return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)
        if self.fast:   # the packed layout is the kernel's own: read the weight back through it
            eye = torch.eye(self.in_features + self.pad, dtype=torch.bfloat16, device=self.qweight.device)
            w = torch._weight_int4pack_mm_for_cpu(eye, self.qweight, self.scheme.group_size, self.scales_zeros).t()
        else:
            sz = self.scales_zeros.float()
            w = dequantize_int4(self.qweight.int(), sz[..., 0].t(), sz[..., 1].t(), self.scheme.group_size)
        return w[:, :self.in_features].to(dtype)                    # (N, K)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype, bias included."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.pad:
            x2 = F.pad(x2, (0, self.pad))
        if self.fast and self.scheme.bits == 8:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        elif self.fast:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.qweight, self.scheme.group_size, self.scales_zeros)
        else:
            y = x2[:, :self.in_features].float() @ self.dequantized(torch.bfloat16).float().t()
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def rows_fn(self):
        """A function x (B, K) -> (B, N) computing exactly what `matmul` computes for rows of the
        model's dtype, with the kernel bound up front (the decode step's one-row Linears)."""
        if not self.fast or self.pad or self.bias is not None:
            return self.matmul
        bf16 = torch.bfloat16
        if self.scheme.bits == 8:
            q, s = self.qweight, self.scales
            return lambda x: torch._weight_int8pack_mm(x.to(bf16), q, s).to(x.dtype)
        q, g, sz = self.qweight, self.scheme.group_size, self.scales_zeros
        return lambda x: torch._weight_int4pack_mm_for_cpu(x.to(bf16), q, g, sz).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuantMatmul.apply(x, self)
        return self.matmul(x)

    @classmethod
    def concat(cls, parts: list["QuantLinear"]) -> "QuantLinear | None":
        """One QuantLinear computing every part's output side by side (same input), whose rows are
        exactly the parts' quantized rows; each part's buffers become views of it, so no memory is
        added. None where the layout does not allow it (mixed schemes or biases; int4's packed
        layout is blocked by 64 output rows, so every part needs a multiple of 64)."""
        first = parts[0]
        if not all(isinstance(p, QuantLinear) for p in parts):
            return None
        same = all(p.scheme == first.scheme and p.fast == first.fast and p.in_features == first.in_features
                   and p.pad == first.pad and (p.bias is None) == (first.bias is None) for p in parts)
        if not same or (first.scheme.bits == 4 and any(p.out_features % 64 for p in parts)):
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.scheme, fused.fast, fused.pad = first.scheme, first.fast, first.pad
        fused.in_features, fused.out_features = first.in_features, sum(p.out_features for p in parts)
        fused.bias = None if first.bias is None else nn.Parameter(torch.cat([p.bias for p in parts]),
                                                                  requires_grad=False)
        names = ["qweight", "scales"] if first.scheme.bits == 8 else ["qweight", "scales_zeros"]
        for name in names:
            dim = 1 if name == "scales_zeros" else 0            # (K/g, N, 2): output rows on dim 1
            fused.register_buffer(name, torch.cat([getattr(p, name) for p in parts], dim))
        row = 0
        for p in parts:         # the parts now read the fused weights (int4's small scale table stays theirs:
            rows = slice(row, row + p.out_features)     # its rows are not contiguous in the fused one)
            for name in names:
                if name != "scales_zeros":
                    p._buffers[name] = getattr(fused, name)[rows]
            if p.bias is not None:
                p.bias = nn.Parameter(fused.bias[rows], requires_grad=False)
            row += p.out_features
        return fused

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
                f"fast={self.fast}")


# ---- a whole model --------------------------------------------------------------------------------

def check_quantizable(cfg, scheme: QuantScheme) -> None:
    """UserError when `scheme` cannot apply to a model of config `cfg` (before loading anything):
    a group wider than a Linear's input would be mostly padding."""
    if scheme.bits != 4:
        return
    widths = {"dim": cfg.dim, "attention width": cfg.n_heads * cfg.dh, "ffn_dim": cfg.ffn_dim}
    for name, k in widths.items():
        if k < scheme.group_size:
            raise UserError(f"{scheme.name}: the model's {name} {k} is narrower than the group size "
                            f"{scheme.group_size} (try a smaller group or int8)")


def quantize_model(model: nn.Module, scheme: QuantScheme | str) -> nn.Module:
    """Replace every Linear in the model's blocks by a QuantLinear of `scheme`, and its lm head
    (`model.output`, when present) by an int8 one; in place, returns the model. Frozen."""
    scheme = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    if scheme.bits == 0:
        return model
    if quantization_of(model) not in ("none", scheme.name):
        raise ValueError(f"model already quantized as {quantization_of(model)}, not {scheme.name}")
    model.requires_grad_(False)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            is_head = parent is model and name == "output"
            setattr(parent, name, QuantLinear(child, QuantScheme(8) if is_head else scheme))
    model.quantization = scheme.name
    return model


def quantization_of(model: nn.Module) -> str:
    """The scheme name a model was quantized with ("none" if never)."""
    return getattr(model, "quantization", "none")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (what a server keeps resident for its span)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def block_weight_bytes(cfg, scheme: QuantScheme, dtype_bytes: int = 4) -> int:
    """Bytes one block's weights take under `scheme` (pure arithmetic, for planning a span)."""
    D, F, Dh = cfg.dim, cfg.ffn_dim, cfg.dh
    shapes = [(cfg.n_heads * Dh, D), (cfg.n_kv_heads * Dh, D), (cfg.n_kv_heads * Dh, D), (D, cfg.n_heads * Dh)]
    shapes += [(F, D), (D, F)] + ([(F, D)] if cfg.family == "llama" else [])
    total = 0
    for n, k in shapes:
        if scheme.bits == 0:
            total += n * k * dtype_bytes
        elif scheme.bits == 8:
            total += n * k + 2 * n
        else:
            groups = -(-k // scheme.group_size)
            total += n * groups * scheme.group_size // 2 + 4 * n * groups
    norms = (4 if cfg.family == "gpt2" else 2) * D * dtype_bytes
    return total + norms
