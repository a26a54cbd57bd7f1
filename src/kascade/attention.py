"""Public attention ops: validate input, then run the Triton kernels (kascade.ops) on CUDA or the reference
elsewhere (also exported as kascade.dense_attention, kascade.anchor_attention, kascade.sparse_attention).

Three ops cover the method, in both phases (decode when Lq == 1, rolling prefill otherwise):

* ``dense_attention``: ordinary causal GQA attention.
* ``anchor_attention``: exact Top-k selection (pooled post-softmax scores) followed by attention over
  the selected keys; with ``dense_output=True`` (layer 0) the output is dense and only the indices are
  sparse. Returns ``(out, indices)``.
* ``sparse_attention``: attention over given indices (reuse layers).

Shapes, padding and index conventions are those of :mod:`kascade.reference`. Index tensors from a
kernel may be wider than the reference's (padded with -1 to a convenient width); the number of real
indices per (row, head[, tile]) is always the budget.

Without a kernel, the ops call the reference's public functions (the selection, and every op with
backend="reference"): this module is where the definition of correct and the fast path meet; the fast
path itself (kascade.ops, kascade.kernels) never imports the reference. The input checks
(kascade.validation), the budget (kascade.budget) and the masks of the CPU SDPA path (kascade.masks) are
modules shared with the reference, never its private helpers.

``backend``: "auto" (Triton for CUDA tensors when available, else reference), "triton" (error if it
cannot run) or "reference". The environment variable KASCADE_BACKEND sets the default.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from . import masks, reference
from .validation import (
    HeadPooling,
    KascadeInputError,
    Pooling,
    check_attention_inputs,
    check_budget,
    check_indices,
    check_tile_size,
    expand_heads,
)

Backend = Literal["auto", "triton", "reference"]
BACKENDS = ("auto", "triton", "reference")


def default_backend() -> Backend:
    value = os.environ.get("KASCADE_BACKEND", "auto")
    if value not in BACKENDS:
        raise KascadeInputError(f"KASCADE_BACKEND={value!r}; expected one of {BACKENDS}")
    return value  # type: ignore[return-value]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(q: torch.Tensor, backend: Backend | None) -> bool:
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise KascadeInputError(f"backend={backend!r}; expected one of {BACKENDS}")
    if backend == "reference":
        return False
    # The interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors; that is how CI tests them.
    runnable = triton_available() and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    if backend == "triton":
        if not runnable:
            raise KascadeInputError(
                f"backend='triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1); q is on {q.device}"
            )
        return True
    return runnable and q.is_cuda


def _kernels(phase: str):
    """The launcher module of a phase (kascade.ops.decode or kascade.ops.prefill), or None."""
    try:
        if phase == "decode":
            from .ops import decode as mod
        else:
            from .ops import prefill as mod
    except ImportError:
        return None
    return mod


def _phase(q: torch.Tensor) -> str:
    return "decode" if q.shape[2] == 1 else "prefill"


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Causal GQA attention, queries aligned to each row's end. Returns [B, Hq, Lq, D]."""
    kv_start, kv_end = check_attention_inputs(q, k, v, kv_start, kv_end)
    mod = _kernels(_phase(q)) if _use_triton(q, backend) else None
    if mod is not None and hasattr(mod, "dense"):
        return mod.dense(q, k, v, kv_start, kv_end, scale=scale)
    if (backend or default_backend()) != "reference":
        # Without a kernel, torch SDPA with an explicit mask beats the reference on CPU and GPU alike.
        return _sdpa_dense(q, k, v, kv_start, kv_end, scale)
    return reference.dense_attention(q, k, v, kv_start, kv_end, scale=scale)


def _sdpa_dense(q, k, v, kv_start, kv_end, scale):
    """Dense attention through torch SDPA with an explicit mask, in query chunks so the [B, Lq, Lk]
    mask stays small (a GPU fallback when no kernel exists, and the fast dense path on CPU)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv != Hq:  # enable_gqa is not taken by every backend; repeat_kv is what HF does anyway
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    keys = torch.arange(Lk, device=q.device)
    out = torch.empty_like(q)
    step = max(1, (1 << 24) // max(1, B * Lk))
    for lo in range(0, Lq, step):
        hi = min(Lq, lo + step)
        qpos = kv_end[:, None] - Lq + torch.arange(lo, hi, device=q.device)[None, :]  # [B, n]
        mask = (keys[None, None, :] <= qpos[:, :, None]) & (keys[None, None, :] >= kv_start[:, None, None])
        o = torch.nn.functional.scaled_dot_product_attention(q[:, :, lo:hi], k, v, attn_mask=mask[:, None],
                                                             scale=scale)
        # Padding queries see no key; SDPA gives NaN there, the convention is zero.
        out[:, :, lo:hi] = torch.nan_to_num(o, nan=0.0) * (qpos >= kv_start[:, None])[:, None, :, None]
    return out


def anchor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    *,
    topk_fraction: float = 0.10,
    topk_floor: int = 128,
    tile_size: int = 32,
    scale: float | None = None,
    dense_output: bool = False,
    pooling: Pooling = "post_softmax",
    head_pooling: HeadPooling = "group",
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select each (row, KV head[, tile])'s Top-k keys and attend over them. Returns (out, indices)."""
    kv_start, kv_end = check_attention_inputs(q, k, v, kv_start, kv_end)
    check_budget(topk_fraction, topk_floor)
    check_tile_size(tile_size)
    phase = _phase(q)
    default_selection = pooling == "post_softmax" and head_pooling == "group"
    mod = _kernels(phase) if default_selection and _use_triton(q, backend) else None
    if mod is not None and hasattr(mod, "anchor"):
        if phase == "decode":
            return mod.anchor(q, k, v, kv_start, kv_end, topk_fraction=topk_fraction, topk_floor=topk_floor,
                              scale=scale, dense_output=dense_output)
        return mod.anchor(q, k, v, kv_start, kv_end, topk_fraction=topk_fraction, topk_floor=topk_floor,
                          tile_size=tile_size, scale=scale, dense_output=dense_output)
    budget = dict(topk_fraction=topk_fraction, topk_floor=topk_floor)
    if phase == "decode":
        indices = reference.select_decode(q, k, kv_start, kv_end, scale=scale, pooling=pooling,
                                          head_pooling=head_pooling, **budget)
    else:
        indices = reference.select_prefill(q, k, kv_start, kv_end, tile_size=tile_size, scale=scale,
                                           pooling=pooling, head_pooling=head_pooling, **budget)
    if dense_output:
        out = dense_attention(q, k, v, kv_start, kv_end, scale=scale, backend=backend)
    else:
        out = sparse_attention(q, k, v, indices, kv_start, kv_end, tile_size=tile_size, scale=scale,
                               backend=backend, **budget)
    return out, indices


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    *,
    topk_fraction: float = 0.10,
    topk_floor: int = 128,
    tile_size: int = 32,
    scale: float | None = None,
    backend: Backend | None = None,
    indices_from_anchor: bool = False,
) -> torch.Tensor:
    """Attention over selected keys (reuse layers). Indices as returned by ``anchor_attention``, with
    heads already mapped to this layer (``indices[:, head_map[layer]]``) or one shared head. The
    Triton prefill kernel refuses a -1 inside a tile's budget; indices_from_anchor=True (the engine,
    passing what anchor_attention just returned) skips that scan."""
    kv_start, kv_end = check_attention_inputs(q, k, v, kv_start, kv_end)
    check_budget(topk_fraction, topk_floor)
    check_tile_size(tile_size)
    phase = _phase(q)
    check_indices(indices, q, k, kv_start, kv_end, tile_size)
    mod = _kernels(phase) if _use_triton(q, backend) else None
    if mod is not None and hasattr(mod, "sparse"):
        indices = expand_heads(indices, k.shape[1])
        if phase == "decode":
            return mod.sparse(q, k, v, indices, kv_start, kv_end, scale=scale)
        return mod.sparse(q, k, v, indices, kv_start, kv_end, topk_fraction=topk_fraction,
                          topk_floor=topk_floor, tile_size=tile_size, scale=scale,
                          indices_from_anchor=indices_from_anchor)
    if (backend or default_backend()) == "reference":
        return reference.sparse_attention(q, k, v, indices, kv_start, kv_end, topk_fraction=topk_fraction,
                                          topk_floor=topk_floor, tile_size=tile_size, scale=scale)
    return _sparse_sdpa(q, k, v, expand_heads(indices, k.shape[1]), kv_start, kv_end,
                        topk_fraction=topk_fraction, topk_floor=topk_floor, tile_size=tile_size, scale=scale)


def _sparse_sdpa(q, k, v, indices, kv_start, kv_end, *, topk_fraction, topk_floor, tile_size, scale):
    """The reference's masks (kascade.masks, shared with it) fed to torch SDPA: same keys, several times
    faster on CPU (no kernel)."""
    decode = q.shape[2] == 1
    out = torch.zeros_like(q)
    Hq, D = q.shape[1], q.shape[3]
    scale = masks.softmax_scale(scale, D)
    for b, row in masks.rows(q, k, v, kv_start, kv_end):
        n_kv, L = row.k.shape[0], row.k.shape[1]
        G = Hq // n_kv
        n = row.q.shape[1]
        step = masks.query_chunk(Hq, L)
        kk = row.k[:, None].expand(n_kv, G, L, D)
        vv = row.v[:, None].expand(n_kv, G, L, D)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            allowed = masks.allowed_keys(row, lo, hi, L, indices[b], decode, topk_fraction, topk_floor,
                                              tile_size)
            qq = row.q[:, lo:hi].reshape(n_kv, G, hi - lo, D)
            o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed, scale=scale)
            out[b, :, row.q_index + lo : row.q_index + hi] = o.reshape(Hq, hi - lo, D).to(q.dtype)
    return out


__all__ = ["Backend", "dense_attention", "anchor_attention", "sparse_attention", "default_backend",
           "triton_available"]
