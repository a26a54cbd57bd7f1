"""Launcher helpers shared by the decode, prefill and paged launchers (kascade.ops.decode / prefill / paged).

What every launcher needs in the same form: the base-2 score scale the kernels take, the dot precision
of a dtype, the kernel-wide input limits, the SM count that sizes the split grids, and the small
rounding helpers that keep stride classes stable (one compiled variant per geometry, not per length).
"""

from __future__ import annotations

import math

import torch

from ..validation import KascadeInputError

# The kernels keep scores in base 2: exp(x) = exp2(x * log2(e)), folded into the score scale.
LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
MAX_GQA = 16
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def qk_scale(scale: float | None, D: int) -> float:
    """The kernels' score factor: the softmax scale (default 1/sqrt(D)) times log2(e)."""
    return (1.0 / math.sqrt(D) if scale is None else float(scale)) * LOG2E


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact fp32 products for float32 inputs (the interpreter and fp32 tests
    compare with the reference at 1e-5), tensor cores otherwise (fp16/bf16 products are exact in tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phase: str) -> int:
    """The limits every attention kernel shares, beyond kascade.validation's generic checks: head_dim,
    dtype, GQA group size and a contiguous head_dim. q/k/v are [B, H, L, D]; phase names the kernels in
    the message ("decode", "prefill"). Returns G = Hq // Hkv."""
    Hq, D = q.shape[1], q.shape[-1]
    Hkv = k.shape[1]
    if D not in HEAD_DIMS:
        raise KascadeInputError(f"{phase} kernels support head_dim in {HEAD_DIMS}, got {D}")
    if q.dtype not in DTYPES:
        raise KascadeInputError(f"{phase} kernels support float16, bfloat16, float32; got {q.dtype}")
    G = Hq // Hkv
    if not 1 <= G <= MAX_GQA:
        raise KascadeInputError(f"{phase} kernels support GQA group sizes 1..{MAX_GQA} (Hq/Hkv), got "
                                f"{Hq}/{Hkv}={G}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise KascadeInputError(f"{name} must be contiguous in head_dim (stride 1), got strides {t.stride()}")
    return G


def check_head_map(head_map: torch.Tensor | None, Hkv: int, device: torch.device) -> None:
    """A reuse layer's head map, read by the kernels: int32 [Hkv] on the device of q (or None)."""
    if head_map is None:
        return
    if not isinstance(head_map, torch.Tensor) or head_map.shape != (Hkv,) or head_map.dtype != torch.int32 \
            or head_map.device != device:
        got = (f"{head_map.dtype} {tuple(head_map.shape)} on {head_map.device}" if isinstance(head_map, torch.Tensor)
               else type(head_map).__name__)
        raise KascadeInputError(f"head_map must be int32 [{Hkv}] on {device}, got {got}")


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 4 in the interpreter, so that the split and
    combine code runs there with a few splits."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def pad16(n: int) -> int:
    """n rounded up to a multiple of 16: widths and row strides of the kernels' buffers, so that their
    stride arguments keep one divisibility class for every length (no recompile per prompt length)."""
    return -(-int(n) // 16) * 16
