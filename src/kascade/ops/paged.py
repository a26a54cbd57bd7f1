"""Launchers of the decode kernels on vLLM's paged KV cache.

Layout (vLLM): q [B, Hq, D] (one decode query per sequence); K and V caches
[num_blocks, block_size, Hkv, D]; block_table [B, max_blocks_per_seq] int32, the physical block of each
logical block of a sequence; seq_lens [B] int32, the number of keys of each sequence: its keys are the
logical positions 0 .. seq_len - 1 (no left padding). Logical position pos of sequence b is the cache
row block_table[b, pos // block_size] * block_size + pos % block_size. Entries of block_table past a
sequence's last block are never read.

These are the contiguous decode kernels (:mod:`kascade.ops.decode`) run with ``PAGED=True``: the same
split-KV score / dense pass, the same radix Top-k selection (over a scores buffer indexed by logical
position, with kv_start = 0 and kv_end = seq_lens), the same sparse pass split over index slots and the
same combine. Only the K/V address of a key goes through the block table (kernels/paged.py). Indices in
and out are LOGICAL positions, [B, Hkv, W] int32, -1 padded, W = topk_budget(Lk_max) rounded up to a
multiple of 16 with Lk_max = max_blocks_per_seq * block_size.

No host synchronisation: sizes come from tensor shapes only, so the launchers can be captured in a CUDA
graph. The shape / dtype / device checks below never read tensor values; ``validate_values=True`` also
checks seq_lens and the used block-table entries (reads them back to the host: for tests and debugging).
A sequence with seq_len 0 (a padding slot of a batch) gets a zero output and all -1 indices.
"""

from __future__ import annotations

import torch

from ..validation import KascadeInputError, check_budget
from . import decode as D

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def _check_paged(q, k_cache, v_cache, block_table, seq_lens):
    """Shape / dtype / device checks (no value reads). Returns (B, Hq, Hkv, block_size, D)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise KascadeInputError(f"q must be [batch, num_q_heads, head_size] (one decode query per sequence), got {got}")
    B, Hq, Dh = q.shape
    if q.dtype not in _FLOAT:
        raise KascadeInputError(f"q has dtype {q.dtype}; expected float16, bfloat16 or float32")
    if Dh not in (64, 128):
        raise KascadeInputError(f"paged decode kernels support head_size 64 or 128, got q head_size {Dh}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise KascadeInputError(
                f"{name} must be [num_blocks, block_size, num_kv_heads, head_size={Dh}], got {got}")
        if t.dtype != q.dtype:
            raise KascadeInputError(f"{name} has dtype {t.dtype}, q has {q.dtype}; they must match")
        if t.device != q.device:
            raise KascadeInputError(f"{name} is on {t.device}, q is on {q.device}")
        if t.shape[3] != Dh:
            raise KascadeInputError(f"{name} has head_size {t.shape[3]}, q has {Dh}: expected "
                                    f"[num_blocks, block_size, num_kv_heads, {Dh}], got {tuple(t.shape)}")
        if t.stride(3) != 1:
            raise KascadeInputError(f"{name} must be contiguous in head_size (stride 1), got strides {t.stride()}")
    if k_cache.shape != v_cache.shape:
        raise KascadeInputError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                                f"{tuple(v_cache.shape)}")
    num_blocks, block_size, Hkv, _ = k_cache.shape
    if block_size < 16 or block_size & (block_size - 1):
        raise KascadeInputError(f"block_size (k_cache.shape[1]) must be a power of two >= 16, got {block_size}")
    if Hkv < 1 or Hq % Hkv:
        raise KascadeInputError(f"num_q_heads ({Hq}) must be a multiple of num_kv_heads ({Hkv}, k_cache.shape[2])")
    if not 1 <= Hq // Hkv <= 16:
        raise KascadeInputError(f"paged decode kernels support GQA group sizes 1..16, got {Hq} // {Hkv} = {Hq // Hkv}")
    if q.stride(2) != 1:
        raise KascadeInputError(f"q must be contiguous in head_size (stride 1), got strides {q.stride()}")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != B:
        got = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
        raise KascadeInputError(f"block_table must be [batch={B}, max_blocks_per_seq], got {got}")
    if block_table.dtype != torch.int32:
        raise KascadeInputError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.device != q.device:
        raise KascadeInputError(f"block_table is on {block_table.device}, q is on {q.device}")
    if block_table.shape[1] < 1:
        raise KascadeInputError(f"block_table must have at least one block per sequence, got "
                                f"{tuple(block_table.shape)}")
    if block_table.stride(1) != 1:
        raise KascadeInputError(f"block_table must be contiguous along its rows, got strides {block_table.stride()}")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.shape != (B,):
        got = tuple(seq_lens.shape) if isinstance(seq_lens, torch.Tensor) else type(seq_lens).__name__
        raise KascadeInputError(f"seq_lens must be [batch={B}], got {got}")
    if seq_lens.dtype != torch.int32:
        raise KascadeInputError(f"seq_lens must be int32, got {seq_lens.dtype}")
    if seq_lens.device != q.device:
        raise KascadeInputError(f"seq_lens is on {seq_lens.device}, q is on {q.device}")
    if block_table.shape[1] * block_size >= 2**31 - 2**16:
        raise KascadeInputError(f"max_blocks_per_seq * block_size = {block_table.shape[1] * block_size} is too "
                                f"long for int32 indices")
    return B, Hq, Hkv, block_size, Dh


def check_paged_values(k_cache, block_table, seq_lens) -> None:
    """Value checks (reads the tensors back to the host): 0 <= seq_lens <= max_blocks * block_size, and
    every block-table entry a sequence uses is a block of the cache."""
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    lk_max = block_table.shape[1] * block_size
    lens = seq_lens.cpu().long()
    if bool((lens < 0).any()) or bool((lens > lk_max).any()):
        raise KascadeInputError(f"seq_lens must lie in [0, max_blocks_per_seq * block_size = {lk_max}], "
                                f"got {lens.tolist()}")
    bt = block_table.cpu().long()
    used = torch.arange(bt.shape[1])[None, :] < ((lens + block_size - 1) // block_size)[:, None]
    bad = used & ((bt < 0) | (bt >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise KascadeInputError(f"block_table[{b}, {j}] = {int(bt[b, j])} is not a block of the cache "
                                f"(num_blocks = {num_blocks}) but sequence {b} (seq_len {int(lens[b])}) uses it")


def _prepare(q, k_cache, v_cache, block_table, seq_lens, validate_values):
    B, Hq, Hkv, block_size, Dh = _check_paged(q, k_cache, v_cache, block_table, seq_lens)
    if validate_values:
        check_paged_values(k_cache, block_table, seq_lens)
    paged = D.PagedKV(block_table=block_table, block_size=block_size)
    kv_start = torch.zeros(B, dtype=torch.int32, device=q.device)
    return q.unsqueeze(2), paged, kv_start, seq_lens.contiguous(), Hkv


def paged_decode_dense(q, k_cache, v_cache, block_table, seq_lens, scale=None, *, validate_values=False):
    """Dense decode attention over each sequence's seq_len keys: out [B, Hq, D] in q's dtype."""
    q4, paged, kv_start, kv_end, _ = _prepare(q, k_cache, v_cache, block_table, seq_lens, validate_values)
    out = D._split_pass(q4, k_cache, v_cache, kv_start, kv_end, scale, write_scores=False, acc_v=True,
                        paged=paged)[3]
    return out[:, :, 0]


def paged_decode_anchor(q, k_cache, v_cache, block_table, seq_lens, *, topk_fraction, topk_floor, scale=None,
                        dense_output=False, validate_values=False):
    """Anchor decode: the exact Top-k (up to near-ties, as ``kascade.ops.decode.anchor``) of the
    GQA-group-pooled post-softmax scores over each sequence's keys, k = topk_budget(seq_len), then sparse
    attention over them (dense_output=True: the dense output instead, layer 0). Returns (out [B, Hq, D],
    indices [B, Hkv, W] int32 logical positions, each row's k indices first, then -1)."""
    check_budget(topk_fraction, topk_floor)
    q4, paged, kv_start, kv_end, _ = _prepare(q, k_cache, v_cache, block_table, seq_lens, validate_values)
    out, indices = D.anchor(q4, k_cache, v_cache, kv_start, kv_end, topk_fraction=topk_fraction,
                            topk_floor=topk_floor, scale=scale, dense_output=dense_output, paged=paged)
    return out[:, :, 0], indices


def paged_decode_sparse(q, k_cache, v_cache, block_table, seq_lens, indices, *, head_map=None, scale=None,
                        budget=None, validate_values=False):
    """Attention over given keys (reuse layers): indices [B, Hkv, W] int32/int64 logical positions (-1 and
    positions >= seq_len are skipped); head_map int32 [Hkv]: KV head h attends over indices[:, head_map[h]].
    budget: (topk_fraction, topk_floor) the indices were selected with (an anchor's): each row then visits
    only its own budget's slots instead of all W. Returns out [B, Hq, D] in q's dtype."""
    B, _, Hkv, _, _ = _check_paged(q, k_cache, v_cache, block_table, seq_lens)
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3 or indices.shape[:2] != (B, Hkv):
        got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise KascadeInputError(f"indices must be [batch={B}, num_kv_heads={Hkv}, W], got {got}")
    if indices.device != q.device:
        raise KascadeInputError(f"indices are on {indices.device}, q is on {q.device}")
    q4, paged, kv_start, kv_end, _ = _prepare(q, k_cache, v_cache, block_table, seq_lens, validate_values)
    out = D.sparse(q4, k_cache, v_cache, indices, kv_start, kv_end, scale=scale, head_map=head_map, paged=paged,
                   budget=budget)
    return out[:, :, 0]
