"""Input checks shared by the reference and the ops, so bad input fails with a message, not deep inside."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KascadeInputError(ValueError):
    """An attention input has the wrong shape, dtype, device or range."""


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] and the per-row key ranges.

    Returns (kv_start, kv_end) as int64 tensors on q's device, filled with defaults when None.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise KascadeInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise KascadeInputError(
                f"{name} must have 4 dims [batch, heads, seq, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise KascadeInputError(f"{name} has dtype {t.dtype}; expected one of float32, float16, bfloat16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise KascadeInputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise KascadeInputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        raise KascadeInputError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B:
        raise KascadeInputError(f"k has batch {k.shape[0]}, q has batch {B}")
    if k.shape[3] != D:
        raise KascadeInputError(f"k has head_dim {k.shape[3]}, q has head_dim {D}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise KascadeInputError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if Lq > Lk:
        raise KascadeInputError(f"query length {Lq} exceeds key length {Lk}; queries align to the end of the keys")
    kv_start = _lengths("kv_start", kv_start, B, 0, q.device)
    kv_end = _lengths("kv_end", kv_end, B, Lk, q.device)
    # Value checks read the tensors back to the host; skip them while a CUDA graph is being captured
    # (the shapes, dtypes and devices above are still checked), so the decode path stays capturable.
    if kv_start.is_cuda and torch.cuda.is_current_stream_capturing():
        return kv_start, kv_end
    if B and (bool((kv_start < 0).any()) or bool((kv_end > Lk).any()) or bool((kv_start >= kv_end).any())):
        raise KascadeInputError(
            f"each row needs 0 <= kv_start < kv_end <= {Lk}; got kv_start={kv_start.tolist()}, "
            f"kv_end={kv_end.tolist()}"
        )
    return kv_start, kv_end


def _lengths(name: str, t: torch.Tensor | None, batch: int, default: int, device: torch.device) -> torch.Tensor:
    if t is None:
        return torch.full((batch,), default, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.shape != (batch,):
        raise KascadeInputError(f"{name} must have shape ({batch},) (one entry per batch row), got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise KascadeInputError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def check_budget(topk_fraction: float, topk_floor: int) -> None:
    if not 0.0 < topk_fraction <= 1.0:
        raise KascadeInputError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    if int(topk_floor) != topk_floor or topk_floor < 1:
        raise KascadeInputError(f"topk_floor must be a positive integer, got {topk_floor}")


def check_tile_size(tile_size: int) -> None:
    if int(tile_size) != tile_size or tile_size < 1:
        raise KascadeInputError(f"tile_size must be a positive integer, got {tile_size}")
