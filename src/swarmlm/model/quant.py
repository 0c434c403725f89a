"""Weight-only quantization: int8 per output channel, int4 per group of input columns.

Applied from outside, after a model is built and loaded, like a parallel plan:

    model, cfg = load_model(path)
    quantize_model(model, "int8")       # every block's Linear -> QuantLinear; the lm head in int8

The weights are quantized at load time from the float checkpoint (nothing quantized is ever
stored), and activations stay in the model's dtype outside the Linears. Inside one, each input
row is quantized to int8 on the fly (one scale per row) and multiplied with the quantized
weights as model/qkernels.py defines: exact integer dot products, then fixed float steps, so the
numbers are the same with its compiled AVX512-VNNI kernels (CPUs that have them: several times
faster than torch's bf16 weight-only kernels at one row) and with its torch reference (any other
machine or device). Gradients flow to the input (fine-tuning with frozen weights), never to the
weights.

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
from swarmlm.model import qkernels

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
    """A frozen Linear whose weight is int8 (per row) or int4 (per group); bias kept in float.

    Its product quantizes each input row to int8 on the fly and computes as model/qkernels.py
    defines (the same numbers with or without the compiled kernels). The weights are kept in the
    kernels' layout: output rows padded to a multiple of 16, input columns to a multiple of 4
    (int8) or of the group (int4: `pad` zero columns)."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme):
        super().__init__()
        if scheme.bits not in (4, 8):
            raise ValueError(f"QuantLinear needs an int8 or int4 scheme, got {scheme}")
        w = linear.weight.detach()
        self.scheme = scheme
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.pad = -self.in_features % (4 if scheme.bits == 8 else scheme.group_size)   # zero columns
        self.pad_rows = -self.out_features % qkernels.BLOCK                                # zero rows
        w = F.pad(w.float(), (0, self.pad, 0, self.pad_rows))
        if scheme.bits == 8:
            q, scales = quantize_int8(w)
            self.register_buffer("qweight", qkernels.pack_int8(q))                    # (N/16, K/4, 16, 4)
            self.register_buffer("scales", scales)                                    # (N,) float32
            self.register_buffer("rowsum", q.sum(1, dtype=torch.int32))               # (N,) int32
        else:
            q, scales, zeros = quantize_int4(w, scheme.group_size)
            blocks = lambda t: t.reshape(-1, qkernels.BLOCK, t.shape[1]).transpose(1, 2).contiguous()  # noqa: E731
            self.register_buffer("qweight", qkernels.pack_int4(q))                    # (N/16, K/8, 16, 4)
            # (N/16, K/g, 16) bfloat16 each: w = q * scale + low
            self.register_buffer("scales", blocks(scales).to(torch.bfloat16))
            self.register_buffer("lows", blocks(zeros - 8.0 * scales).to(torch.bfloat16))
        self.fast = qkernels.extension() is not None and w.device.type == "cpu"

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the products use, (N, K) in `dtype` (gradients, tests)."""
        if self.scheme.bits == 8:
            w = qkernels.unpack_int8(self.qweight).float() * self.scales[:, None]
        else:
            g = self.scheme.group_size
            q = qkernels.unpack_int4(self.qweight).float()
            N, K = q.shape
            per_col = lambda t: t.transpose(1, 2).reshape(N, K // g, 1)               # noqa: E731
            w = (q.reshape(N, K // g, g) * per_col(self.scales.float()) + per_col(self.lows.float())).reshape(N, K)
        return w[:self.out_features, :self.in_features].to(dtype)

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K padded) -> (M, N padded) float32."""
        if self.scheme.bits == 8:
            return qkernels.int8_matmul(x2, self.qweight, self.scales, self.rowsum)
        return qkernels.int4_matmul(x2, self.qweight, self.scales, self.lows, self.scheme.group_size)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype, bias included."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.pad:
            x2 = F.pad(x2, (0, self.pad))
        y = self._product(x2)
        if self.pad_rows:
            y = y[:, :self.out_features]
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def kernel_args(self) -> tuple[tuple[torch.Tensor, ...], int] | None:
        """(the compiled kernel's tensor arguments, the int4 group or 0) where one row of this layer's
        product is exactly one kernel call (no padding or bias, CPU, the kernels built), else None."""
        if self.pad or self.pad_rows or self.bias is not None or self.qweight.device.type != "cpu":
            return None
        if qkernels.extension() is None:
            return None
        if self.scheme.bits == 8:
            args = (self.qweight, self.scales, self.rowsum)
        else:
            args = (self.qweight, self.scales, self.lows)
        return (args, self.scheme.group_size) if all(t.is_contiguous() for t in args) else None

    def rows_fn(self):
        """A function x (B, K) -> (B, N) computing exactly what `matmul` computes for rows of the
        model's dtype, with the kernel bound up front (the decode step's one-row Linears)."""
        bound = self.kernel_args()
        if bound is None:
            return self.matmul
        (q, s, r), g = bound
        f32 = torch.float32
        ext = qkernels.extension()
        if self.scheme.bits == 8:       # the kernels take rows of any float dtype and answer float32
            f8 = ext.int8_gemm
            return lambda x: f8(x, q, s, r) if x.dtype == f32 else f8(x, q, s, r).to(x.dtype)
        f4 = ext.int4_gemm
        return lambda x: f4(x, q, s, r, g) if x.dtype == f32 else f4(x, q, s, r, g).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuantMatmul.apply(x, self)
        return self.matmul(x)

    @classmethod
    def concat(cls, parts: list["QuantLinear"]) -> "QuantLinear | None":
        """One QuantLinear computing every part's output side by side (same input), whose rows are
        exactly the parts' quantized rows; each part's buffers become views of it, so no memory is
        added. None where the layout does not allow it (mixed schemes or biases, or a part whose
        rows are padded: the layout is blocked by 16 output rows)."""
        first = parts[0]
        if not all(isinstance(p, QuantLinear) for p in parts):
            return None
        same = all(p.scheme == first.scheme and p.in_features == first.in_features and p.pad == first.pad
                   and not p.pad_rows and (p.bias is None) == (first.bias is None) for p in parts)
        if not same:
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.scheme, fused.fast, fused.pad, fused.pad_rows = first.scheme, first.fast, first.pad, 0
        fused.in_features, fused.out_features = first.in_features, sum(p.out_features for p in parts)
        fused.bias = None if first.bias is None else nn.Parameter(torch.cat([p.bias for p in parts]),
                                                                  requires_grad=False)
        names = ["qweight", "scales", "rowsum"] if first.scheme.bits == 8 else ["qweight", "scales", "lows"]
        for name in names:              # every buffer has its output rows (or blocks of 16) on dim 0
            fused.register_buffer(name, torch.cat([getattr(p, name) for p in parts], 0))
        row = 0
        for p in parts:                 # the parts now read the fused weights
            rows = slice(row, row + p.out_features)
            blocks = slice(row // qkernels.BLOCK, (row + p.out_features) // qkernels.BLOCK)
            for name in names:
                p._buffers[name] = getattr(fused, name)[blocks if getattr(fused, name).dim() > 1 else rows]
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
        n = -(-n // 16) * 16                               # the kernels' layout: rows in blocks of 16
        if scheme.bits == 0:
            total += n * k * dtype_bytes
        elif scheme.bits == 8:
            total += n * -(-k // 4) * 4 + 8 * n            # int8 weights, float32 scale and int32 row sum
        else:
            groups = -(-k // scheme.group_size)
            total += n * groups * scheme.group_size // 2 + 4 * n * groups   # bfloat16 scale and low per group
    norms = (4 if cfg.family == "gpt2" else 2) * D * dtype_bytes
    return total + norms
