"""Input checks shared by the reference and the ops, so bad input fails with a message, not deep inside."""

from __future__ import annotations

from typing import Literal

import torch

# Selection options (kascade.reference, kascade.attention.anchor_attention): how scores are pooled into one
# Top-k set, and over which heads.
Pooling = Literal["post_softmax", "pre_softmax"]
HeadPooling = Literal["group", "all"]

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


def check_indices(
    indices: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    tile_size: int | None = None,
) -> None:
    """Validate the selected indices given to sparse attention, against q [B, Hq, Lq, D], k [B, Hkv, Lk, D].

    Decode (Lq == 1): [B, Hsel, k]; prefill: [B, Hsel, n_tiles, k], with n_tiles covering the longest
    row (ceil(max(kv_end - kv_start) / tile_size), checked when kv_start, kv_end and tile_size are
    given). Hsel is Hkv, or 1 for one set shared by all heads. int32/int64 on q's device, every index
    < Lk (-1 marks an unused slot). Each wrong shape raises a KascadeInputError naming the shape expected.
    """
    B, Hkv, Lk = q.shape[0], k.shape[1], k.shape[2]
    decode = q.shape[2] == 1
    if not decode and tile_size is not None:
        check_tile_size(tile_size)
    phase = "decode" if decode else "prefill"
    layout = "[B, Hsel, k]" if decode else "[B, Hsel, n_tiles, k]"
    expected = f"B={B}, Hsel={Hkv} (KV heads) or 1"
    if not decode and kv_start is not None and kv_end is not None and tile_size is not None:
        n_tiles = _tiles_needed(kv_start, kv_end, tile_size)
        if n_tiles is not None:
            expected += f", n_tiles >= {n_tiles} (ceil(longest row / tile_size={tile_size}))"
    else:
        n_tiles = None
    want = f"{phase} indices must be {layout} with {expected}"
    if not isinstance(indices, torch.Tensor):
        raise KascadeInputError(f"{want}; got {type(indices).__name__}")
    shape = tuple(indices.shape)
    if indices.dim() != (3 if decode else 4):
        raise KascadeInputError(f"{want}; got {shape}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise KascadeInputError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.device != q.device:
        raise KascadeInputError(f"indices are on {indices.device}, q is on {q.device}")
    if shape[0] != B:
        raise KascadeInputError(f"indices have batch {shape[0]}, q has batch {B}: {want}; got {shape}")
    if shape[1] not in (Hkv, 1):
        raise KascadeInputError(
            f"indices have {shape[1]} heads, expected {Hkv} KV heads or 1 (all heads pooled): {want}; got {shape}"
        )
    if n_tiles is not None and shape[2] < n_tiles:
        raise KascadeInputError(f"indices have {shape[2]} tiles, the longest row needs {n_tiles}: {want}; got {shape}")
    capturing = indices.is_cuda and torch.cuda.is_current_stream_capturing()  # no host reads in a graph
    if indices.numel() and not capturing and int(indices.max()) >= Lk:
        raise KascadeInputError(f"index {int(indices.max())} out of range for key length {Lk}")


def _tiles_needed(kv_start: torch.Tensor, kv_end: torch.Tensor, tile_size: int) -> int | None:
    """ceil(longest row / tile_size), or None while a CUDA graph is captured (no host reads then)."""
    if kv_start.numel() == 0 or (kv_start.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    return max(1, -(-int((kv_end - kv_start).max()) // int(tile_size)))


def expand_heads(indices: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Indices with one shared head set ([B, 1, ...]) broadcast to n_kv KV heads; others unchanged."""
    if indices.shape[1] == n_kv:
        return indices
    if indices.shape[1] == 1:
        return indices.expand(indices.shape[0], n_kv, *indices.shape[2:])
    raise KascadeInputError(
        f"indices have {indices.shape[1]} heads, expected {n_kv} KV heads or 1 (all heads pooled)"
    )
