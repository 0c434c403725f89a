"""Quantized matrix products on rows: int8 / int4 weights, activations quantized per row to int8.

The numbers are defined here, in torch (`int8_reference`, `int4_reference`), so they are the same
on every machine and device: a row x is quantized symmetrically (sx = max|x| / 127, xq =
round(x / sx), half to even); the integer dot products with the quantized weights are exact (sums
of integers below 2^24 are exact in float32, whatever the order), and the float steps after
them are fixed elementwise operations:

    int8 (one scale per output row):    y = float(Σ w·xq) * (sx * scale)
    int4 (w = q * scale + low per group of g columns, q in 0..15):
        acc = 0; for each group: acc = acc + float(Σ q·xq) * scale;  acc = acc + low * float(Σ xq)
        y = acc * sx

A small C++ extension (csrc/qgemv.cpp, AVX512-VNNI) computes exactly the same numbers several
times faster on CPUs that have VNNI; it is compiled once by torch.utils.cpp_extension (cached
under torch's extension directory) on first use, and where it cannot be (no compiler, no VNNI,
SWARMLM_NO_KERNELS=1) the reference runs. The tests check the two are bit for bit equal, so a
server with the extension and a client without it still agree token for token. The same
extension holds the compiled one-row decode step (csrc/decode.cpp, see model/fastdecode.py).

Weight layout (`pack_int8`, `pack_int4`): output rows in blocks of 16 (padded with zero rows),
4 input columns of 16 rows per 64 bytes: int8 (Nb, K/4, 16, 4); int4 (Nb, K/8, 16, 4) bytes
whose low nibble is column 8j + t and high nibble column 8j + 4 + t, with a bfloat16 scale and
low per group and row (N/16, K/g, 16). Knows nothing of models.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

BLOCK = 16
_CHUNK = 1024          # int8 columns per float32 partial sum: 127 * 127 * 1024 < 2^24, exact


# ---- layouts (pure tensor functions) ------------------------------------------------------------

def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) int8, N a multiple of 16 and K of 4 -> (N/16, K/4, 16, 4)."""
    N, K = q.shape
    return q.reshape(N // BLOCK, BLOCK, K // 4, 4).permute(0, 2, 1, 3).contiguous()


def unpack_int8(w: torch.Tensor) -> torch.Tensor:
    Nb, K4 = w.shape[:2]
    return w.permute(0, 2, 1, 3).reshape(Nb * BLOCK, K4 * 4)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers in 0..15, N a multiple of 16 and K of 8 -> (N/16, K/8, 16, 4) uint8."""
    N, K = q.shape
    q = q.to(torch.uint8).reshape(N // BLOCK, BLOCK, K // 8, 2, 4).permute(0, 2, 1, 3, 4)   # (Nb, K8, 16, 2, 4)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).contiguous()


def unpack_int4(w: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (N, K) uint8 in 0..15."""
    Nb, K8 = w.shape[:2]
    q = torch.stack([w & 0x0F, w >> 4], 3)                                              # (Nb, K8, 16, 2, 4)
    return q.permute(0, 2, 1, 3, 4).reshape(Nb * BLOCK, K8 * 8)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float32 -> (xq (M, K) float32 holding integers in -127..127, sx (M, 1) float32)."""
    sx = x.abs().amax(1, keepdim=True) / 127.0
    sx = torch.where(sx == 0, torch.ones_like(sx), sx)
    return torch.round(x / sx).clamp(-127, 127), sx


# ---- the reference --------------------------------------------------------------------------------

def int8_reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32, w packed int8, scales (N,) float32 -> (M, N) float32."""
    xq, sx = quantize_rows(x)
    wq = unpack_int8(w).to(torch.float32)                                               # (N, K)
    K = x.shape[1]
    isum = sum(((xq[:, k:k + _CHUNK] @ wq[:, k:k + _CHUNK].t()).to(torch.int64) for k in range(0, K, _CHUNK)),
               torch.zeros((), dtype=torch.int64, device=x.device))
    return isum.to(torch.float32) * (sx * scales)


def int4_reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor,
                   group: int) -> torch.Tensor:
    """x (M, K) float32, w packed int4, scales and lows (N/16, K/g, 16) bfloat16 -> (M, N) float32."""
    xq, sx = quantize_rows(x)
    M, K = x.shape
    G = K // group
    q = unpack_int4(w).to(torch.float32).reshape(-1, G, group)                        # (N, G, g)
    xg = xq.reshape(M, G, group)
    isum = torch.einsum("mgj,ngj->gmn", xg, q)                  # (G, M, N): each below 15 * 127 * 128
    xsum = xg.sum(-1).t()[..., None]                            # (G, M, 1), exact
    s = scales.float().permute(1, 0, 2).reshape(G, -1)          # (G, N)
    lo = lows.float().permute(1, 0, 2).reshape(G, -1)
    acc = torch.zeros(M, s.shape[1], dtype=torch.float32, device=x.device)
    for g in range(G):
        acc = acc + isum[g] * s[g]
        acc = acc + lo[g] * xsum[g]
    return acc * sx


# ---- the extension ------------------------------------------------------------------------------

_LOCK = threading.Lock()
_EXT: list = []             # [module or None], once tried


@functools.cache
def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512_vnni"))


def extension():
    """The compiled kernels, or None where they cannot be had here (compiled on the first call)."""
    if _EXT:                    # every product asks: no lock once the answer is known
        return _EXT[0]
    with _LOCK:
        if not _EXT:
            _EXT.append(_build())
        return _EXT[0]


def _wanted() -> bool:
    return not os.environ.get("SWARMLM_NO_KERNELS") and _cpu_has_vnni()


def prepare() -> None:
    """Import the build tooling now, on this thread, where the kernels will be tried.

    Call it before starting threads that may build them. torch's cpp_extension imports setuptools,
    whose distutils hack inserts and removes an entry at the front of `sys.meta_path`; another
    thread that is importing at that moment walks the shifted list, can miss the path finder and
    fail with ModuleNotFoundError (a server's start-up once failed so: its multiaddr check could
    not import a codec). Costs the import, about 0.1 s, that the first build pays anyway.
    """
    if _wanted() and not _EXT:
        _import_tools()


def _import_tools() -> None:
    with contextlib.suppress(Exception):        # a broken toolchain is _build's to report (as None)
        import torch.utils.cpp_extension  # noqa: F401


def _build():
    if not _wanted():
        return None
    try:
        from torch.utils import cpp_extension
        if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
            return None                 # torch builds with ninja (scripts/setup installs both)
        sources = [str(Path(__file__).parent / "csrc" / name) for name in ("qgemv.cpp", "decode.cpp")]
        return cpp_extension.load(
            name="swarmlm_qgemv", sources=sources, verbose=False,
            extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                          "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"])
    except Exception:           # noqa: BLE001 - any build failure means the reference path
        return None


def describe() -> str:
    """One line: which path quantized products take here, and why."""
    if extension() is not None:
        return "compiled AVX512-VNNI kernels"
    if os.environ.get("SWARMLM_NO_KERNELS"):
        return "torch reference (SWARMLM_NO_KERNELS is set)"
    if not _cpu_has_vnni():
        return "torch reference (this CPU has no AVX512-VNNI)"
    return "torch reference (the kernels could not be built: is there a C++ compiler and ninja?)"


def _use_extension(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and extension() is not None


def int8_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, rowsum: torch.Tensor) -> torch.Tensor:
    """x (M, K) any float -> (M, N) float32; `rowsum` (N,) int32 is the weights' row sums (the kernel's)."""
    x = x.to(torch.float32).contiguous()
    if _use_extension(x) and w.is_contiguous():
        return extension().int8_gemm(x, w, scales, rowsum)
    return int8_reference(x, w, scales)


def int4_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor, group: int) -> torch.Tensor:
    x = x.to(torch.float32).contiguous()
    if _use_extension(x) and w.is_contiguous() and scales.is_contiguous() and lows.is_contiguous():
        return extension().int4_gemm(x, w, scales, lows, group)
    return int4_reference(x, w, scales, lows, group)


def pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, n)) if n else t
