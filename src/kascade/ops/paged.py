"""Launchers of the decode and rolling-prefill kernels on vLLM's paged KV cache.

Decode (``paged_decode_*``) below; rolling prefill of vLLM's packed varlen batches
(``paged_prefill_*``) in the second half of the module, with its own layout notes.

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
import triton

from ..kernels import decode as kd
from ..validation import KascadeInputError, check_budget
from . import decode as D
from . import prefill as PF
from ._launch import DTYPES, HEAD_DIMS, MAX_GQA, check_head_map


def _check_q(q, layout: str, phase: str, head_dims) -> tuple[int, int, int]:
    """q [rows, num_q_heads, head_size] of one phase ("decode": a query per sequence, "prefill": packed)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise KascadeInputError(f"q must be {layout}, got {got}")
    if q.dtype not in DTYPES:
        raise KascadeInputError(f"q has dtype {q.dtype}; expected float16, bfloat16 or float32")
    if q.shape[2] not in head_dims:
        raise KascadeInputError(f"paged {phase} kernels support head_size in {tuple(head_dims)}, got q head_size "
                                f"{q.shape[2]}")
    if q.stride(2) != 1:
        raise KascadeInputError(f"q must be contiguous in head_size (stride 1), got strides {q.stride()}")
    return tuple(q.shape)


def _check_int32(name: str, t, layout: str, q, shape_ok) -> None:
    """An int32 metadata tensor (block_table, seq_lens, query_start_loc) of the right shape on q's device."""
    if not isinstance(t, torch.Tensor) or not shape_ok(t):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise KascadeInputError(f"{name} must be {layout}, got {got}")
    if t.dtype != torch.int32:
        raise KascadeInputError(f"{name} must be int32, got {t.dtype}")
    if t.device != q.device:
        raise KascadeInputError(f"{name} is on {t.device}, q is on {q.device}")


def _check_paged(q, k_cache, v_cache, block_table, seq_lens):
    """Shape / dtype / device checks (no value reads). Returns (B, Hq, Hkv, block_size, D)."""
    B, Hq, Dh = _check_q(q, "[batch, num_q_heads, head_size] (one decode query per sequence)", "decode", HEAD_DIMS)
    Hkv, block_size = _check_cache_tables(q, B, Hq, Dh, k_cache, v_cache, block_table, seq_lens, "decode")
    return B, Hq, Hkv, block_size, Dh


def _check_cache_tables(q, B, Hq, Dh, k_cache, v_cache, block_table, seq_lens, kind):
    """Checks of the caches, the block table and seq_lens against q's dtype / device / head_size and
    the batch size B (no value reads). Returns (Hkv, block_size)."""
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
    if not 1 <= Hq // Hkv <= MAX_GQA:
        raise KascadeInputError(f"paged {kind} kernels support GQA group sizes 1..{MAX_GQA}, got {Hq} // {Hkv} = "
                                f"{Hq // Hkv}")
    _check_int32("block_table", block_table, f"[batch={B}, max_blocks_per_seq]", q,
                 lambda t: t.dim() == 2 and t.shape[0] == B)
    if block_table.shape[1] < 1:
        raise KascadeInputError(f"block_table must have at least one block per sequence, got "
                                f"{tuple(block_table.shape)}")
    if block_table.stride(1) != 1:
        raise KascadeInputError(f"block_table must be contiguous along its rows, got strides {block_table.stride()}")
    _check_int32("seq_lens", seq_lens, f"[batch={B}]", q, lambda t: t.shape == (B,))
    if block_table.shape[1] * block_size >= 2**31 - 2**16:
        raise KascadeInputError(f"max_blocks_per_seq * block_size = {block_table.shape[1] * block_size} is too "
                                f"long for int32 indices")
    return Hkv, block_size


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


def paged_decode_dense(q, k_cache, v_cache, block_table, seq_lens, scale=None, *, validate_values=False,
                       config: D.DecodeConfig = D.DEFAULT_CONFIG):
    """Dense decode attention over each sequence's seq_len keys: out [B, Hq, D] in q's dtype."""
    q4, paged, kv_start, kv_end, _ = _prepare(q, k_cache, v_cache, block_table, seq_lens, validate_values)
    out = D._split_pass(q4, k_cache, v_cache, kv_start, kv_end, scale, write_scores=False, acc_v=True,
                        paged=paged, config=config)[3]
    return out[:, :, 0]


def paged_decode_anchor(q, k_cache, v_cache, block_table, seq_lens, *, topk_fraction, topk_floor, scale=None,
                        dense_output=False, validate_values=False, config: D.DecodeConfig = D.DEFAULT_CONFIG):
    """Anchor decode: the exact Top-k (up to near-ties, as ``kascade.ops.decode.anchor``) of the
    GQA-group-pooled post-softmax scores over each sequence's keys, k = topk_budget(seq_len), then sparse
    attention over them (dense_output=True: the dense output instead, layer 0). Returns (out [B, Hq, D],
    indices [B, Hkv, W] int32 logical positions, each row's k indices first, then -1)."""
    check_budget(topk_fraction, topk_floor)
    q4, paged, kv_start, kv_end, _ = _prepare(q, k_cache, v_cache, block_table, seq_lens, validate_values)
    out, indices = D.anchor(q4, k_cache, v_cache, kv_start, kv_end, topk_fraction=topk_fraction,
                            topk_floor=topk_floor, scale=scale, dense_output=dense_output, paged=paged,
                            config=config)
    return out[:, :, 0], indices


def _reuse_indices_ok(indices, dims: int, B: int, Hkv: int, head_map) -> bool:
    """Indices of a reuse layer: [B, Hkv, ...] of ``dims`` dimensions; with a head map they may hold more
    KV heads than the cache (an anchor's indices all-gathered over tensor-parallel ranks: the map holds
    the model's head numbers, each < indices.shape[1])."""
    if not isinstance(indices, torch.Tensor) or indices.dim() != dims or indices.shape[0] != B:
        return False
    return indices.shape[1] >= Hkv if head_map is not None else indices.shape[1] == Hkv


def paged_physical_indices(indices, block_table, seq_lens, block_size: int, out=None):
    """The cache rows (block_table[b, i // block_size] * block_size + i % block_size) of an anchor's logical
    indices i: decode [B, H, W] or prefill [B, H, n_slots, W] int32 (-1, and positions >= seq_len, become -1),
    into a new int32 tensor of the same shape, or into out (out=indices: in place). One launch per anchor
    layer; every reuse layer after it then passes physical=True to paged_decode_sparse /
    paged_prefill_sparse and gathers K/V without reading the block table (one dependent load less per key)."""
    if not isinstance(indices, torch.Tensor) or indices.dim() not in (3, 4) or indices.dtype != torch.int32:
        got = (indices.dtype, tuple(indices.shape)) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise KascadeInputError(f"indices must be int32 [batch, heads, W] or [batch, heads, n_slots, W], got {got}")
    B, W = indices.shape[0], indices.shape[-1]
    _check_int32("block_table", block_table, f"[batch={B}, max_blocks_per_seq]", indices,
                 lambda t: t.dim() == 2 and t.shape[0] == B and t.stride(1) == 1)
    _check_int32("seq_lens", seq_lens, f"[batch={B}]", indices, lambda t: t.shape == (B,))
    if block_size < 16 or block_size & (block_size - 1):
        raise KascadeInputError(f"block_size must be a power of two >= 16, got {block_size}")
    if out is None:
        out = torch.empty(indices.shape, dtype=torch.int32, device=indices.device)
    elif out.shape != indices.shape or out.dtype != torch.int32 or not out.is_contiguous():
        raise KascadeInputError(f"out must be a contiguous int32 tensor of shape {tuple(indices.shape)}, got "
                                f"{out.dtype} {tuple(out.shape)}")
    rows = indices.reshape(B, -1, W)  # a view where the layout allows it (the launch reads rows by stride)
    if rows.stride(2) != 1:
        rows = rows.contiguous()
    H = rows.shape[1]
    block = 1024
    kd.physical_indices_kernel[(B * H, triton.cdiv(W, block))](
        rows, out, block_table, seq_lens.contiguous(), H, W, rows.stride(0), rows.stride(1),
        block_table.stride(0), PAGE=block_size, BLOCK=block, num_warps=4)
    return out


def paged_decode_sparse(q, k_cache, v_cache, block_table, seq_lens, indices, *, head_map=None, scale=None,
                        budget=None, physical=False, validate_values=False,
                        config: D.DecodeConfig = D.DEFAULT_CONFIG):
    """Attention over given keys (reuse layers): indices [B, Hkv, W] int32/int64 logical positions (-1 and
    positions >= seq_len are skipped); head_map int32 [Hkv]: KV head h attends over indices[:, head_map[h]]
    (then indices may hold more heads than the cache, e.g. all-gathered over TP ranks).
    budget: (topk_fraction, topk_floor) the indices were selected with (an anchor's): each row then visits
    only its own budget's slots instead of all W. physical: the indices are cache rows from
    paged_physical_indices (-1 skipped). Returns out
    [B, Hq, D] in q's dtype."""
    B, _, Hkv, _, _ = _check_paged(q, k_cache, v_cache, block_table, seq_lens)
    if not _reuse_indices_ok(indices, 3, B, Hkv, head_map):
        got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise KascadeInputError(f"indices must be [batch={B}, num_kv_heads={Hkv}, W], got {got}")
    if indices.device != q.device:
        raise KascadeInputError(f"indices are on {indices.device}, q is on {q.device}")
    q4, paged, kv_start, kv_end, _ = _prepare(q, k_cache, v_cache, block_table, seq_lens, validate_values)
    out = D.sparse(q4, k_cache, v_cache, indices, kv_start, kv_end, scale=scale, head_map=head_map, paged=paged,
                   budget=budget, physical=physical, config=config)
    return out[:, :, 0]


# --------------------------------------------------------------------------------------------- prefill
# Rolling prefill (kascade.reference's rule) for vLLM's packed varlen batches, through the contiguous
# prefill kernels (kascade.kernels.prefill) compiled with PAGED=True.
#
# Layout: q [total_tokens, Hq, D]; query_start_loc [B+1] int32: sequence b's queries are q rows
# query_start_loc[b] .. query_start_loc[b+1] - 1 and are the LAST q_len_b tokens of the sequence, whose
# keys are the logical positions 0 .. seq_lens[b] - 1 already in the paged cache (chunked prefill:
# seq_lens[b] >= q_len_b; q_len_b == seq_lens[b] is a whole prompt, q_len_b == 1 a decode row).
# Caches, block_table and seq_lens as for decode. Every row is handled by the rolling prefill rule:
# tile t (row-relative = logical positions t*T .. t*T+T-1; no left padding) attends to the
# topk_budget(t*T) keys of its prefix chosen by the anchor plus its own tile causally, or densely when
# its prefix fits its budget. A decode row (q_len 1) in such a batch follows the same rule (its tile's
# prefix budget + its own tile), not the decode rule of paged_decode_* (Top-k over all its keys).
#
# Indices (anchor out, sparse in): [B, Hkv, n_slots, W] int32 LOGICAL positions, -1 padded, where slot s
# of sequence b is its tile first_tile_b + s, first_tile_b = (seq_lens[b] - q_len_b) // T (the tile of
# its first query), n_slots = (max_query_len + T - 2) // T + 1 (the most tiles max_query_len consecutive
# positions touch) and W = topk_budget(the longest prefix below max_seq_len) rounded up to a multiple
# of 16. A sparse tile's first topk_budget(t*T) slots hold its keys (ascending), -1 after them; dense
# tiles and slots past a sequence's last tile hold -1. (The tile axis covers only the tiles that have
# queries, not every tile of max_seq_len: chunked prefill of a long context stays small.)
#
# Host sizes: max_query_len (>= every q_len; sizes the grids) and max_seq_len (>= every seq_len; default
# max_blocks_per_seq * block_size: sizes the budget table and W) are passed by the caller (vLLM's
# metadata has both); the launchers never read device tensors back, except with validate_values=True
# (tests, debugging), which checks seq_lens, the used block-table entries, query_start_loc, the two host
# sizes and (sparse) that every budget slot of the given indices is filled. Lengths are runtime kernel
# arguments: new seq_lens / query lengths do not recompile.
#
# gather_kv=True: the call first copies its sequences' K/V out of the pages (gather_kv below: B x
# ceil(max_seq_len / block_size) blocks, in logical order) and the kernels read that copy without the
# block table. Same results; faster where the dense passes dominate (long prefixes), at the cost of the
# copy's memory (2 x B x Lk x Hkv x D elements).


def _check_prefill(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, max_query_len, max_seq_len,
                   tile_size):
    """Shape / dtype / device / size checks of a paged prefill call (no value reads). Returns
    (B, Hq, Hkv, block_size, G, max_seq_len)."""
    total, Hq, Dh = _check_q(q, "[total_tokens, num_q_heads, head_size] (packed varlen queries)", "prefill",
                             PF.HEAD_DIMS)
    if q.numel() >= 2**31:
        raise KascadeInputError(f"q has {q.numel()} elements; the prefill kernels index it with int32 (< 2^31)")
    _check_int32("query_start_loc", query_start_loc, "[batch + 1] (batch >= 1)", q,
                 lambda t: t.dim() == 1 and t.shape[0] >= 2)
    B = query_start_loc.shape[0] - 1
    Hkv, block_size = _check_cache_tables(q, B, Hq, Dh, k_cache, v_cache, block_table, seq_lens, "prefill")
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, int) or max_query_len < 1:
        raise KascadeInputError(f"max_query_len must be a host int >= 1 (the longest q_len of the batch), "
                                f"got {max_query_len!r}")
    lk_max = block_table.shape[1] * block_size
    if max_seq_len is None:
        max_seq_len = lk_max
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or not 1 <= max_seq_len <= lk_max:
        raise KascadeInputError(f"max_seq_len must be a host int in [1, max_blocks_per_seq * block_size = "
                                f"{lk_max}] (the longest seq_len of the batch), got {max_seq_len!r}")
    if tile_size is not None and tile_size not in PF.TILE_SIZES:
        raise KascadeInputError(f"paged prefill kernels support tile_size in {PF.TILE_SIZES}, got {tile_size}")
    return B, Hq, Hkv, block_size, Hq // Hkv, max_seq_len


def check_prefill_values(q, k_cache, block_table, seq_lens, query_start_loc, max_query_len, max_seq_len) -> None:
    """Value checks of a paged prefill call (reads the tensors back): check_paged_values, then
    query_start_loc starts at 0, never decreases and ends within q's total_tokens; every q_len is at
    least 1, at most its seq_len and at most max_query_len; every seq_len is at most max_seq_len."""
    check_paged_values(k_cache, block_table, seq_lens)
    qsl = query_start_loc.cpu().long()
    q_lens = qsl[1:] - qsl[:-1]
    lens = seq_lens.cpu().long()
    if int(qsl[0]) != 0 or bool((q_lens < 1).any()) or int(qsl[-1]) > q.shape[0]:
        raise KascadeInputError(f"query_start_loc must start at 0, increase by >= 1 per sequence and end at most "
                                f"at total_tokens = {q.shape[0]}, got {qsl.tolist()}")
    for name, bad in (("seq_lens", q_lens > lens), ("max_query_len", q_lens > max_query_len)):
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise KascadeInputError(f"sequence {b} has q_len {int(q_lens[b])} > {name} "
                                    f"{int(lens[b]) if name == 'seq_lens' else max_query_len}")
    if bool((lens > max_seq_len).any()):
        raise KascadeInputError(f"seq_lens {lens.tolist()} exceed max_seq_len {max_seq_len}")


def gather_kv(k_cache, v_cache, block_table, max_seq_len: int):
    """The first ceil(max_seq_len / block_size) blocks of every sequence's K and V, copied from the pages
    in logical order: (k, v) [B, Hkv, Lk, D] views (Lk = those blocks * block_size) of [Hkv, B, Lk, D]
    tensors, one copy kernel each. Positions past a sequence's seq_len hold whatever its block-table
    entries point at (clamped to the cache) and are never read. Why: the prefill kernels' dense passes
    (layer 0, the anchors' log-sum-exp and pooling) read every prefix key; through the block table each
    key costs a table read and a per-row address (+20-48 % per layer at 128K on the H100,
    benchmarks/notes_serve.md), the copy reads the prefix once (~0.4 ms per layer at 128K x 8 KV heads)."""
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    n = -(-max_seq_len // block_size)
    pages = block_table[:, :n].clamp(0, num_blocks - 1).reshape(-1)
    B = block_table.shape[0]

    def one(cache):  # [num_blocks, bs, Hkv, D] -> [Hkv, B * n, bs, D] -> [B, Hkv, n * bs, D]
        t = cache.permute(2, 0, 1, 3).index_select(1, pages)
        return t.view(t.shape[0], B, n * block_size, t.shape[3]).transpose(0, 1)

    return one(k_cache), one(v_cache)


def _prepare_prefill(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, max_query_len, max_seq_len,
                     tile_size, validate_values, gather=False):
    """Checks, then (paged layout, seq_lens, B, Hkv, G, max_seq_len, k, v): k / v the caches, or with
    gather=True their gather_kv copies (the layout then has no block table)."""
    B, Hq, Hkv, block_size, G, max_seq_len = _check_prefill(
        q, k_cache, v_cache, block_table, seq_lens, query_start_loc, max_query_len, max_seq_len, tile_size)
    if validate_values:
        check_prefill_values(q, k_cache, block_table, seq_lens, query_start_loc, max_query_len, max_seq_len)
    k, v = gather_kv(k_cache, v_cache, block_table, max_seq_len) if gather else (k_cache, v_cache)
    paged = PF.PagedPrefill(block_table=None if gather else block_table, block_size=block_size,
                            query_start_loc=query_start_loc.contiguous(), max_query_len=max_query_len)
    return paged, seq_lens.contiguous(), B, Hkv, G, max_seq_len, k, v


def _prepare_rolling(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, max_query_len, max_seq_len,
                     topk_fraction, topk_floor, tile_size, validate_values, gather):
    """_prepare_prefill of an anchor / sparse call, plus its budget: (paged, lens, B, Hkv, G, max_seq_len,
    k, v, n_tiles, host budgets per tile (-1: dense), the same on the device, index width W)."""
    check_budget(topk_fraction, topk_floor)
    paged, lens, B, Hkv, G, max_seq_len, k, v = _prepare_prefill(
        q, k_cache, v_cache, block_table, seq_lens, query_start_loc, max_query_len, max_seq_len, tile_size,
        validate_values, gather)
    n_tiles = max(1, -(-max_seq_len // tile_size))
    host, budgets, width = PF.tile_budgets(n_tiles, tile_size, topk_fraction, topk_floor, q.device)
    return paged, lens, B, Hkv, G, max_seq_len, k, v, n_tiles, host, budgets, width


def paged_prefill_dense(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, *, max_query_len,
                        max_seq_len=None, scale=None, gather_kv=False, validate_values=False,
                        config: PF.PrefillConfig = PF.DEFAULT_CONFIG):
    """Causal GQA attention of packed varlen queries over their sequences' paged keys (each query at
    logical position seq_len - q_len + i sees positions <= its own). Returns out [total_tokens, Hq, D] in
    q's dtype (rows past query_start_loc[B] are zero)."""
    paged, lens, *_, k, v = _prepare_prefill(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                                             max_query_len, max_seq_len, None, validate_values, gather_kv)
    out, _ = PF._flash(q, k, v, lens, lens, scale, with_v=True, store_lse=False, pad_rows=True, paged=paged,
                       config=config)
    return out


def paged_prefill_anchor(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, *, max_query_len,
                         topk_fraction, topk_floor, tile_size, max_seq_len=None, scale=None, dense_output=False,
                         dense=None, gather_kv=False, validate_values=False,
                         config: PF.PrefillConfig = PF.DEFAULT_CONFIG):
    """Anchor layer of a rolling prefill: for each tile with queries x GQA group, the Top-k of its prefix
    by post-softmax probabilities summed over the tile's queries (of this call) and the group (exact up to
    the near-ties of kascade.ops.prefill.anchor's radix select), then sparse attention over them plus the
    own tile (dense_output=True: the dense output instead, layer 0). Returns (out [total_tokens, Hq, D],
    indices [B, Hkv, n_slots, W] int32 logical positions as described above this function).

    dense: with dense_output=True, layer 0's dense causal attention of these queries computed elsewhere, as
    (out like q, natural-log log-sum-exp float32 [Hq, total_tokens]): FlashAttention 3's varlen output with
    return_softmax_lse on the same paged chunks. The call then only selects."""
    paged, lens, B, Hkv, G, max_seq_len, k, v, n_tiles, host, budgets, width = _prepare_rolling(
        q, k_cache, v_cache, block_table, seq_lens, query_start_loc, max_query_len, max_seq_len, topk_fraction,
        topk_floor, tile_size, validate_values, gather_kv)
    T = tile_size
    indices = torch.full((B, Hkv, paged.n_slots(T), width), -1, dtype=torch.int32, device=q.device)
    if dense is None:
        out, lse = PF._flash(q, k, v, lens, lens, scale, with_v=dense_output, store_lse=True, pad_rows=True,
                             paged=paged, config=config)
    else:
        out, lse = _given_dense(q, dense, dense_output)
    if PF._first_sparse_tile(host) < n_tiles:
        PF._select(q, k, lse, indices, budgets, lens, lens, G, T, 0, n_tiles, scale, paged=paged, config=config)
    if not dense_output:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        PF._launch_sparse(q, k, v, out, indices, budgets, lens, lens, G, T, scale, paged=paged, config=config)
    return out, indices


def _given_dense(q, dense, dense_output: bool):
    """(out, base-2 lse in the flash pass's layout) from a caller's (out, natural-log lse), checked."""
    if not dense_output:
        raise KascadeInputError("dense= is layer 0's dense attention: pass it with dense_output=True")
    out, lse = dense
    Hq, n = q.shape[1], q.shape[0]
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype:
        raise KascadeInputError(f"dense output must be like q {tuple(q.shape)} {q.dtype}, got "
                                f"{getattr(out, 'shape', type(out).__name__)} {getattr(out, 'dtype', '')}")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (Hq, n) or lse.dtype != torch.float32:
        raise KascadeInputError(f"dense log-sum-exp must be float32 [Hq={Hq}, tokens={n}], got "
                                f"{getattr(lse, 'shape', type(lse).__name__)} {getattr(lse, 'dtype', '')}")
    lse2 = PF._lse_buffer(1, Hq, n, q.device)[0]
    lse2.copy_(lse).mul_(PF.LOG2E)
    return out, lse2


def paged_prefill_sparse(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, indices, *, max_query_len,
                         topk_fraction, topk_floor, tile_size, max_seq_len=None, head_map=None, scale=None,
                         physical=False, gather_kv=False, validate_values=False,
                         config: PF.PrefillConfig = PF.DEFAULT_CONFIG):
    """Reuse layer of a rolling prefill: each tile x GQA group attends to its indices (as
    paged_prefill_anchor returns them, for the same batch, tile size, budget and max_seq_len) plus its
    own tile causally; dense tiles attend to their whole prefix. head_map int32 [Hkv] on q's device: KV
    head h reads indices[:, head_map[h]] (in the kernel, no copy). A sparse tile's budget slots are read
    without a mask: every one must hold a key of its prefix (validate_values=True checks it).
    physical: the indices are cache rows (paged_physical_indices of the anchor's), read without the block
    table (dense tiles and the own tile still use it); not with gather_kv (a copy has no cache rows).
    Returns out [total_tokens, Hq, D]."""
    paged, lens, B, Hkv, G, max_seq_len, k, v, n_tiles, host, budgets, width = _prepare_rolling(
        q, k_cache, v_cache, block_table, seq_lens, query_start_loc, max_query_len, max_seq_len, topk_fraction,
        topk_floor, tile_size, validate_values, gather_kv)
    T = tile_size
    n_slots = paged.n_slots(T)
    if not _reuse_indices_ok(indices, 4, B, Hkv, head_map):
        got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise KascadeInputError(f"indices must be [batch={B}, num_kv_heads={Hkv}, n_slots, W], got {got}")
    if indices.dtype not in (torch.int32, torch.int64) or indices.device != q.device:
        raise KascadeInputError(f"indices must be int32 or int64 on {q.device}, got {indices.dtype} on "
                                f"{indices.device}")
    if indices.shape[2] < n_slots or indices.shape[3] < max(host):
        raise KascadeInputError(f"indices {tuple(indices.shape)} are too small: max_query_len {max_query_len} needs "
                                f"{n_slots} tile slots and max_seq_len {max_seq_len} a width of {max(host)}")
    check_head_map(head_map, Hkv, q.device)
    if physical and gather_kv:
        raise KascadeInputError("physical indices are cache rows: they cannot address a gather_kv copy")
    if physical and k_cache.shape[0] * k_cache.shape[1] >= 2**31:
        raise KascadeInputError(f"a cache of {k_cache.shape[0]} blocks x {k_cache.shape[1]} slots has too many rows "
                                "for int32 physical indices")
    if indices.dtype != torch.int32 or indices.stride(-1) != 1:
        indices = indices.to(torch.int32).contiguous()
    if validate_values:
        rows = k_cache.shape[0] * k_cache.shape[1] if physical else None
        _check_prefill_indices(indices, head_map, seq_lens, query_start_loc, T, host, rows)
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    PF._launch_sparse(q, k, v, out, indices, budgets, lens, lens, G, T, scale, head_map, paged=paged,
                      physical=physical, config=config)
    return out


def _check_prefill_indices(indices, head_map, seq_lens, query_start_loc, T, host, cache_rows=None) -> None:
    """Every sparse tile with queries must hold keys of its prefix (0 <= index < t*T) in its first
    budget slots, for the index rows a KV head reads (through head_map); physical indices (cache_rows
    given) rows of the cache, 0 <= index < cache_rows."""
    idx = indices.cpu().long()
    if head_map is not None:
        idx = idx[:, head_map.cpu().long()]
    lens = seq_lens.cpu().long().tolist()
    qsl = query_start_loc.cpu().long().tolist()
    for b, L in enumerate(lens):
        q_pos = L - (qsl[b + 1] - qsl[b])
        first = q_pos // T
        for t in range(first, -(-L // T)):
            kb = host[t]
            if kb < 0:
                continue
            sel = idx[b, :, t - first, :kb]
            hi = t * T if cache_rows is None else cache_rows
            bad = (sel < 0) | (sel >= hi)
            if bool(bad.any()):
                h, j = (int(x) for x in bad.nonzero()[0])
                what = f"a key of the tile's prefix [0, {hi})" if cache_rows is None else f"a cache row in [0, {hi})"
                raise KascadeInputError(
                    f"indices[{b}, {h}, {t - first}, {j}] = {int(sel[h, j])} (sequence {b}, tile {t}) is not {what} "
                    f"inside its budget of {kb}: the prefill kernel reads every budget slot, as "
                    "paged_prefill_anchor fills them")
