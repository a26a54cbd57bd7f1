"""Launchers of the Triton decode kernels (one query per row); :mod:`kascade.attention` dispatches here.

Shapes and index conventions are :mod:`kascade.reference`'s: q [B, Hq, 1, D], k/v [B, Hkv, Lk, D] (a
contiguous KV cache; row b's valid keys are kv_start[b] <= j < kv_end[b]), indices [B, Hkv, W] int32
holding absolute key positions, -1 padded.

* ``dense``: split-KV ("flash-decoding") dense attention: the key axis is cut into splits so that even
  batch 1 fills the GPU; each program handles one (row, KV head, split) with the whole GQA group (K/V
  read once per KV head); the splits are merged by the last split of each row to finish, or by a
  combine kernel when a row has many splits.
* ``anchor``: the same split pass over K only (V is not read), storing the scores of the group
  (:class:`AnchorScores`: float16 for 16-bit inputs, relative to the split's running max, key-major so
  that one key's heads are one vector) and each split's max/sum; then pooling (sum over the group of the post-softmax probabilities) fused with the
  first radix-select histogram, two more histogram passes, a compaction pass writing the indices, and
  ``sparse`` over them, gathering the stored scores and V (K is read once). ``dense_output=True``
  (layer 0) reads V in the split pass and returns its dense output instead.
* ``sparse``: each (row, KV head) gathers K/V rows at its indices, split over the index slots, then the
  splits are merged as in ``dense``.

No host synchronisation: every size below comes from tensor shapes, the budget of each row is computed
on the device (kascade.budget.topk_budget's integer formula), so the ops can be captured in a CUDA graph.
The index width is W = topk_budget(Lk) rounded up to a multiple of 16 (>= every row's budget; -1 past it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton

from ..budget import topk_budget
from ..kernels import decode as kd
from ..kernels import topk as kt
from ..validation import KascadeInputError
from ._launch import check_head_map, check_kernel_inputs, dot_precision, pad16, qk_scale, sm_count

@dataclass(frozen=True)
class DecodeConfig:
    """Block sizes and launch settings of the decode launchers, passed explicitly (``config=``; default
    :data:`DEFAULT_CONFIG`, the fastest measured on the H100, benchmarks/notes_decode.md). Benchmarks and
    tests build variants with ``dataclasses.replace``. Only knobs that some caller sets to another value
    are here; the radix digits of the selection are not a knob but its tie rule (kernels/topk.py)."""

    block_n: int = 128  # keys per iteration of the split (dense / score) pass
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 4  # programs per SM the split counts aim for
    min_chunk: int = 512  # fewest keys per split of the split pass
    max_splits: int = 128  # most splits per row (split pass and sparse pass)
    # Split lengths of the split pass are multiples of this (None: block_n). Tests cut splits through
    # paged-cache blocks with a finer grain.
    chunk_align: int | None = None
    sparse_block_n: int = 64  # index slots per iteration of the sparse pass
    sparse_num_warps: int = 4
    sparse_num_stages: int = 3
    sparse_min_chunk: int = 128  # fewest index slots per split of the sparse pass
    # Split lengths of the sparse pass are multiples of this many slots (None: sparse_block_n).
    sparse_chunk_align: int | None = None
    # Programs per SM the sparse split count aims for. 3, measured on the H100
    # (benchmarks/results/decode_tune2.json): one split per row at batch 64 (direct store, no merge;
    # reuse -2 % at 32K, -7 % at 8K) and one wave of 41 splits x 8 rows at batch 1 (-2 %).
    sparse_programs_per_sm: float = 3
    # The anchor's own sparse step (scores gathered from its score pass) for GQA groups of at least
    # anchor_wide_group heads: each slot gathers a group's worth of stored scores, and more, shorter
    # splits hide that latency (H100, 32K batch 16, benchmarks/results/anchor_profile_h100_*.json: the step
    # -24 % at 28/4/128, -50 % at 16/2/128 and 32/2/64). Smaller groups keep the reuse settings above
    # (at 32/8 the shorter splits cost +19 % at batch 16 and +8 % of the whole anchor at 128K batch 1).
    anchor_wide_group: int = 7
    anchor_sparse_programs_per_sm: float = 12
    anchor_sparse_min_chunk: int = 64
    # With at most this many splits per row, the last split of a row merges them (no combine launch);
    # with more, one combine program per query head does (one program merging 256 splits was slow).
    fuse_max_splits: int = 16
    select_block: int = 2048  # keys per iteration of the selection passes
    select_num_warps: int = 8
    select_programs_per_sm: int = 8  # programs per SM the selection passes aim for
    select_min_chunk: int = 4096  # fewest keys per selection program
    # Hybrid histograms of the 2nd / 3rd radix level: a block of select_block keys with at most this many
    # keys inside the boundary prefix adds them with relaxed atomics (one per key) instead of tl.histogram,
    # whose cost does not depend on how many keys the mask keeps; 0: tl.histogram always. Level 3 keeps
    # only the keys of one level-2 bin (a few per block), so its pass becomes a plain read of the pooled
    # scores. (0, 64): selection -8 % at 128K b64, -6 % at 32K (tune2).
    select_atomic_max: tuple[int, int] = (0, 64)
    # One launch for the whole selection where few rows leave the GPU mostly idle (batch 1): the passes
    # meet at per-row barriers instead of kernel boundaries. "auto": on CUDA for at most
    # select_fused_max_rows rows; "always": on CUDA whenever the grid fits, and in the interpreter (one
    # program per row there); False: never. Measured at 128K batch 1 (decode_tune5_loop.json): 40.6 ->
    # 37.8 us per selection with 2 programs / SM (1 program / SM: 42.6 us). On CUDA the fused grid is
    # always a cooperative launch: the driver then refuses a grid that cannot be resident at once (an
    # error, caught below) instead of letting its barriers wait forever (no measurable cost).
    select_fused: str | bool = "auto"
    select_fused_programs_per_sm: int = 2  # resident programs per SM the fused grid may use
    select_fused_min_chunk: int = 2048  # fewest keys per fused program
    select_fused_max_rows: int = 32  # "auto" fuses up to this many rows (batch x KV heads)


DEFAULT_CONFIG = DecodeConfig()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Check what the decode kernels need beyond kascade.validation; returns (B, Hq, Hkv, Lk, D)."""
    if q.shape[2] != 1:
        raise KascadeInputError(f"decode kernels take one query per row (Lq=1), got Lq={q.shape[2]}")
    check_kernel_inputs(q, k, v, "decode")
    B, Hq, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Lk >= 2**31 - 2**16:
        raise KascadeInputError(f"key length {Lk} is too long for int32 indices")
    return B, Hq, Hkv, Lk, D


@dataclass(frozen=True)
class PagedKV:
    """K/V given as vLLM paged caches [num_blocks, block_size, Hkv, D] with a block table int32
    [B, max_blocks] (checked by :mod:`kascade.ops.paged`, which builds this). Positions, the scores
    buffer and indices stay logical; the kernels translate a key's address through the block table."""

    block_table: torch.Tensor
    block_size: int


def _kv_layout(q, k, v, paged: PagedKV | None):
    """Geometry and the K/V arguments of the split / sparse kernels: (B, Hq, Hkv, Lk, D, kv_strides,
    block_table, paged_strides, paged_meta). Contiguous caches are checked here (_check); a paged cache
    was checked by ops.paged. Its key axis is the logical one, Lk = max_blocks * block_size; it has no
    batch stride (rows differ only by their block table)."""
    if paged is None:
        B, Hq, Hkv, Lk, D = _check(q, k, v)
        kv_strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
        return B, Hq, Hkv, Lk, D, kv_strides, k, (0, 0, 0), {}
    bt = paged.block_table
    B, Hq, _, D = q.shape
    Hkv = k.shape[2]
    Lk = bt.shape[1] * paged.block_size
    kv_strides = (0, k.stride(2), k.stride(1), 0, v.stride(2), v.stride(1))
    return (B, Hq, Hkv, Lk, D, kv_strides, bt, (bt.stride(0), k.stride(0), v.stride(0)),
            dict(PAGED=True, PAGE=paged.block_size))


@dataclass(frozen=True)
class AnchorScores:
    """The score pass's scores of an anchor layer, read back by the selection and the sparse step.

    values [B*Hkv, Lk, GS]: exp2(s - m) * 2^15 per key and head (kernels/decode.py, _store_scores), s the
    base-2 scaled score, m the split's running max when the key was read; float16 for fp16 / bf16 inputs
    (2^-11 relative, finer than the inputs' own rounding), float32 for float32 inputs; GS = G rounded up to
    a power of two (heads past G hold 0). ref [B*Hkv, cdiv(Lk, group), GS] float32: m of each group of
    `group` keys counted from the row's start."""

    values: torch.Tensor
    ref: torch.Tensor
    group: int


def _score_layout(G: int, align: int, block: int) -> tuple[int, int]:
    """(GS, MG): the stored head width and the keys per reference group (a divisor of the split alignment
    and of the block, so that every split and block starts on a group)."""
    return triton.next_power_of_2(G), math.gcd(align, block)


# Values the pooling pass holds per iteration (keys x stored heads): the same register footprint at
# every group size (at G 8 and 16 a 2048-key block held 4-8x more than at G 4, and the fused selection's
# cooperative grid no longer fit).
POOL_TILE = 8192


def _pool_block(block: int, GS: int) -> int:
    """Keys per iteration of the pooling pass: POOL_TILE values, a power of two dividing block."""
    return max(1, min(block, POOL_TILE // GS))


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _counter(device: torch.device, rows: int) -> torch.Tensor:
    """Zeroed int32 tickets, one per row, for the fused combine. The kernels leave every ticket at 0
    again, so outside graph capture one buffer per (device, stream) is reused with no memset per call
    (separate streams never share tickets). Under capture a fresh zeroed buffer is taken each call (a
    memset node in the graph), so a graph never depends on state from outside it."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(rows, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < rows:
        buf = torch.zeros(max(rows, 1024, 2 * (buf.numel() if buf is not None else 0)), dtype=torch.int32,
                          device=device)
        _COUNTERS[key] = buf
    return buf


def _combine_meta(G: int, D: int, n_splits: int) -> dict:
    sp = triton.next_power_of_2(n_splits)
    gq = triton.next_power_of_2(G)
    return dict(GQ=gq, SP=sp, SB=max(1, min(sp, 4096 // (gq * D))))


def _splits(rows: int, length: int, device: torch.device, block: int, min_chunk: int, programs_per_sm: float,
            max_splits: int, align: int | None) -> tuple[int, int]:
    """(n_splits, chunk): cut an axis of `length` into chunks (multiples of align, default block) so that
    rows * n_splits is about programs_per_sm * SMs."""
    want = max(1, math.ceil(programs_per_sm * sm_count(device) / max(rows, 1)))
    n = max(1, min(want, triton.cdiv(length, min_chunk), max_splits))
    align = block if align is None else align
    chunk = triton.cdiv(triton.cdiv(length, n), align) * align
    return triton.cdiv(length, chunk), chunk


def _gp(G: int) -> int:
    return max(16, triton.next_power_of_2(G))


def _split_pass(q, k, v, kv_start, kv_end, scale, write_scores: bool, acc_v: bool, paged: PagedKV | None = None,
                config: DecodeConfig = DEFAULT_CONFIG):
    """Launch decode_split_kernel; returns (AnchorScores or None, m, l, out or None, n_splits): out is the
    dense output when acc_v. paged: K/V are paged caches (kv_start / kv_end then hold logical positions)."""
    B, Hq, Hkv, Lk, D, kv_strides, bt, pg_strides, pg_meta = _kv_layout(q, k, v, paged)
    G = Hq // Hkv
    rows = B * Hkv
    c = config
    block = c.block_n
    # the grid comes from the capacity Lk (fixed for a CUDA graph); each row cuts its own length over it
    n_splits, _ = _splits(rows, Lk, q.device, block, c.min_chunk, c.programs_per_sm, c.max_splits, c.chunk_align)
    f32 = dict(dtype=torch.float32, device=q.device)
    align = c.chunk_align or block
    GS, MG = _score_layout(G, align, block)
    if write_scores:
        values = torch.empty((rows, Lk, GS), dtype=torch.float32 if q.dtype == torch.float32 else torch.float16,
                             device=q.device)
        scores = AnchorScores(values, torch.empty((rows, triton.cdiv(Lk, MG), GS), **f32), MG)
        s_args = (values, scores.ref)
    else:
        scores = None
        s_args = (q.new_empty((1,), dtype=torch.float32),) * 2
    m = torch.empty((rows, n_splits, G), **f32)
    l = torch.empty((rows, n_splits, G), **f32)
    o = torch.empty((rows, n_splits, G, D), **f32) if acc_v else m
    fuse = acc_v and n_splits <= c.fuse_max_splits
    out = torch.empty_like(q) if fuse else q
    counter = _counter(q.device, rows) if fuse else m
    kv_start, kv_end = kv_start.contiguous(), kv_end.contiguous()
    kd.decode_split_kernel[(rows, n_splits)](
        q, k, v, kv_start, kv_end, *s_args, m, l, o, out, counter, bt,
        qk_scale(scale, D),
        q.stride(0), q.stride(1),
        *kv_strides,
        out.stride(0), out.stride(1),
        *pg_strides,
        Hkv, Lk, n_splits,
        G=G, GP=_gp(G), D=D, BLOCK_N=block, WRITE_SCORES=write_scores, ACC_V=acc_v,
        PRECISION=dot_precision(q.dtype), FUSE_COMBINE=fuse, **_combine_meta(G, D, n_splits),
        ALIGN=align, **pg_meta, GS=GS, MG=MG,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    if acc_v and not fuse:
        out = _combine(q, m, l, o, n_splits, Hkv)
    return scores, m, l, (out if acc_v else None), n_splits


def _combine(q, m, l, o, n_splits, Hkv):
    B, Hq, _, D = q.shape
    G = Hq // Hkv
    out = torch.empty_like(q)
    sp = triton.next_power_of_2(n_splits)
    kd.decode_combine_kernel[(B * Hq,)](
        m, l, o, out, out.stride(0), out.stride(1), Hkv, n_splits, G=G, D=D, SP=sp, SB=min(sp, 4096 // D),
        num_warps=4,
    )
    return out


def dense(q, k, v, kv_start, kv_end, *, scale=None, config: DecodeConfig = DEFAULT_CONFIG):
    """Dense decode attention (split-KV). q [B, Hq, 1, D] -> out [B, Hq, 1, D] in q's dtype."""
    return _split_pass(q, k, v, kv_start, kv_end, scale, write_scores=False, acc_v=True, config=config)[3]


def sparse_splits(rows: int, width: int, device: torch.device,
                  config: DecodeConfig = DEFAULT_CONFIG) -> tuple[int, int]:
    """(n_splits, chunk) of the sparse pass over `width` index slots per row."""
    c = config
    return _splits(rows, width, device, c.sparse_block_n, c.sparse_min_chunk, c.sparse_programs_per_sm,
                   c.max_splits, c.sparse_chunk_align)


def sparse(q, k, v, indices, kv_start, kv_end, *, scale=None, scores=None, head_map=None, budget=None,
           paged: PagedKV | None = None, physical: bool = False, config: DecodeConfig = DEFAULT_CONFIG):
    """Attention over each (row, KV head)'s selected keys: indices [B, Hkv, W] (absolute positions,
    -1 and positions outside [kv_start, kv_end) ignored). Returns [B, Hq, 1, D] in q's dtype.
    scores: the anchor's score-pass output (AnchorScores); when given, scores are gathered from it instead
    of recomputed from K.
    head_map: int32 [Hkv] on the device: KV head h attends over indices[:, head_map[h]] (read in the
    kernel; no copy). budget: (topk_fraction, topk_floor) of the indices: each row then visits only its
    own budget's slots (what ``anchor`` writes first), not all W. paged: K/V are paged caches; indices
    are logical positions, or with physical=True cache rows block * block_size + slot
    (ops.paged.paged_physical_indices; -1 skipped), any block stride (vLLM interleaves K and V per block)."""
    B, Hq, Hkv, Lk, D, kv_strides, bt, pg_strides, pg_meta = _kv_layout(q, k, v, paged)
    # with a head map, the indices may hold more heads than K (an anchor's indices all-gathered over TP ranks)
    heads_ok = indices.shape[1] >= Hkv if head_map is not None else indices.shape[1] == Hkv
    if indices.dim() != 3 or indices.shape[0] != B or not heads_ok:
        raise KascadeInputError(f"decode indices must be [B={B}, Hkv={Hkv}, W], got {tuple(indices.shape)}")
    check_head_map(head_map, Hkv, q.device)
    if indices.dtype not in (torch.int32, torch.int64):
        raise KascadeInputError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.stride(2) != 1:
        indices = indices.contiguous()
    G = Hq // Hkv
    if physical and (paged is None or scores is not None):
        raise KascadeInputError("physical indices need a paged cache and no scores")
    if physical and k.shape[0] * paged.block_size >= 2**31:
        raise KascadeInputError(f"a cache of {k.shape[0]} blocks x {paged.block_size} slots has too many rows for "
                                f"int32 physical indices")
    GS = triton.next_power_of_2(G)
    if scores is not None:
        _check_scores(scores, B * Hkv, Lk, GS)
    rows = B * Hkv
    W = indices.shape[2]
    c = config
    if scores is not None and G >= c.anchor_wide_group:
        c = dataclasses.replace(c, sparse_programs_per_sm=c.anchor_sparse_programs_per_sm,
                                sparse_min_chunk=c.anchor_sparse_min_chunk)
    block = c.sparse_block_n
    n_splits, _ = sparse_splits(rows, W, q.device, c)
    # one split per row: its program stores the output itself (no partials, no merge)
    direct = n_splits == 1
    f32 = dict(dtype=torch.float32, device=q.device)
    if direct:
        m = l = o = q.new_empty((1,), dtype=torch.float32)
    else:
        m = torch.empty((rows, n_splits, G), **f32)
        l = torch.empty((rows, n_splits, G), **f32)
        o = torch.empty((rows, n_splits, G, D), **f32)
    fuse = n_splits <= c.fuse_max_splits and not direct
    out = torch.empty_like(q)
    counter = _counter(q.device, rows) if fuse else m
    kv_start, kv_end = kv_start.contiguous(), kv_end.contiguous()
    ppm, floor = (round(budget[0] * 1_000_000), int(budget[1])) if budget is not None else (0, 0)
    s_args = (scores.values, scores.ref) if scores is not None else (m, m)
    kd.decode_sparse_kernel[(rows, n_splits)](
        q, k, v, indices, (head_map if head_map is not None else indices), kv_start, kv_end,
        *s_args, m, l, o, out, counter, bt,
        qk_scale(scale, D),
        q.stride(0), q.stride(1),
        *kv_strides,
        indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1),
        *pg_strides,
        Hkv, Lk, W, n_splits, ppm, floor,
        G=G, GP=_gp(G), D=D, BLOCK_N=block, PRECISION=dot_precision(q.dtype), FROM_SCORES=scores is not None,
        FUSE_COMBINE=fuse, **_combine_meta(G, D, n_splits), ALIGN=c.sparse_chunk_align or block,
        DIRECT=direct, MAPPED=head_map is not None,
        BUDGET_BOUND=budget is not None, PHYSICAL=physical, **pg_meta,
        GS=GS, MG=scores.group if scores is not None else 1,
        num_warps=c.sparse_num_warps, num_stages=c.sparse_num_stages,
    )
    return out if (fuse or direct) else _combine(q, m, l, o, n_splits, Hkv)


def _check_scores(scores, rows: int, Lk: int, GS: int) -> None:
    """The score pass's AnchorScores for `rows` rows of Lk keys and GS stored heads, or a clear error."""
    if not isinstance(scores, AnchorScores):
        raise KascadeInputError(f"scores must be the AnchorScores of the anchor's score pass, got {type(scores).__name__}")
    v, r, mg = scores.values, scores.ref, scores.group
    if (v.shape != (rows, Lk, GS) or v.dtype not in (torch.float16, torch.float32) or not v.is_contiguous()
            or mg < 1 or r.shape != (rows, triton.cdiv(Lk, mg), GS) or r.dtype != torch.float32
            or not r.is_contiguous()):
        raise KascadeInputError(
            f"scores must hold contiguous values [{rows}, {Lk}, {GS}] (float16 or float32) and float32 references "
            f"[{rows}, cdiv({Lk}, group), {GS}], got values {v.dtype} {tuple(v.shape)}, references {r.dtype} "
            f"{tuple(r.shape)}, group {mg}")


def _select_fused(rows: int, device: torch.device, config: DecodeConfig) -> bool:
    """Whether the one-launch selection applies: asked for, few rows (select_fused_max_rows: with
    many rows the four-launch path already fills the GPU), and at least one program per row fits in the
    programs it may keep resident (select_fused_programs_per_sm x SMs; the interpreter runs one program per
    row, so its barriers never wait on a program that has not started)."""
    mode = config.select_fused
    if not mode:
        return False
    if device.type != "cuda":
        return mode == "always"
    if mode == "auto" and rows > config.select_fused_max_rows:
        return False
    return rows <= config.select_fused_programs_per_sm * sm_count(device) // 2


def select(scores, m, l, n_splits, kv_start, kv_end, *, Hkv, topk_fraction, topk_floor,
           config: DecodeConfig = DEFAULT_CONFIG):
    """Top-k over pooled post-softmax scores from the split pass (AnchorScores, split partials
    m, l [B*Hkv, n_splits, G]): indices [B, Hkv, W] int32, W = topk_budget(Lk) rounded up to 16."""
    rows, _, G = m.shape
    Lk, GS = scores.values.shape[1], scores.values.shape[2]
    _check_scores(scores, rows, Lk, triton.next_power_of_2(G))
    B = rows // Hkv
    # rounded up to 16 (the compaction writes -1 past each row's budget): one stride class per geometry
    W = pad16(max(1, topk_budget(Lk, topk_fraction, topk_floor)))
    ppm = round(topk_fraction * 1_000_000)
    device = scores.values.device
    c = config
    block = c.select_block
    if not 1 <= block < 1 << 16:
        raise KascadeInputError(f"select_block must be below 65536 (ranks share an int32), got {block}")
    fused = _select_fused(rows, device, c)
    if fused:  # one launch: every program of the grid must be resident at once (the passes meet at barriers)
        resident = c.select_fused_programs_per_sm * sm_count(device) if device.type == "cuda" else rows
        want = max(1, resident // rows)  # the interpreter: one program per row
        min_chunk = c.select_fused_min_chunk
    else:
        want = triton.cdiv(c.select_programs_per_sm * sm_count(device), max(rows, 1))
        min_chunk = c.select_min_chunk
    sel_splits = max(1, min(want, triton.cdiv(Lk, min_chunk), c.max_splits))
    chunk = triton.cdiv(triton.cdiv(Lk, sel_splits), block) * block
    sel_splits = triton.cdiv(Lk, chunk)  # the grid; each row cuts its own length over it (row_chunk)
    w_chunk = triton.cdiv(W, sel_splits)
    b2, b3 = kt.B2, kt.B3  # the tie rule's digits (kernels/topk.py), not a tuning knob
    kv_start, kv_end = kv_start.contiguous(), kv_end.contiguous()
    pooled = torch.empty((rows, Lk), dtype=torch.float32, device=device)
    # the histograms and, after them, one barrier counter per row: zeroed by one memset
    zeros = torch.zeros(rows * kt.HIST_STRIDE + rows, dtype=torch.int32, device=device)
    hist, bar = zeros[: rows * kt.HIST_STRIDE].view(rows, kt.HIST_STRIDE), zeros[rows * kt.HIST_STRIDE:]
    part = torch.empty((rows, sel_splits, kt.PART_STRIDE), dtype=torch.int32, device=device)
    indices = torch.empty((B, Hkv, W), dtype=torch.int32, device=device)
    grid = (rows, sel_splits)
    nw = c.select_num_warps
    a2, a3 = (max(0, int(a)) for a in c.select_atomic_max)
    if fused and (G, str(device)) in _FUSED_REFUSED:
        fused = False
    if fused:
        try:
            _launch_select_fused(grid, scores, m, l, kv_start, kv_end, pooled, hist, part, indices, bar, Hkv, Lk, W,
                                 n_splits, w_chunk, ppm, topk_floor, sel_splits, G, block, b2, b3, nw, a2, a3, device)
            return indices
        except RuntimeError as exc:  # the driver refused the co-resident grid (e.g. this G's registers)
            if "cooperative" not in str(exc):
                raise
            _FUSED_REFUSED.add((G, str(device)))
            hist.zero_()
    kt.pool_hist_kernel[grid](
        scores.values, scores.ref, m, l, kv_start, kv_end, pooled, hist, Hkv, Lk, n_splits, sel_splits,
        G=G, GS=GS, MG=scores.group, SP=triton.next_power_of_2(n_splits), BLOCK=block, NB=kt.NBINS,
        PB=_pool_block(block, GS),
        num_warps=nw,
    )
    for level, bits, shift, amax in ((2, b2, 23, a2), (3, b3, 23 - b2, a3)):
        kt.refine_hist_kernel[grid](
            pooled, kv_start, kv_end, hist, part, Hkv, Lk, ppm, int(topk_floor), sel_splits,
            LEVEL=level, B2=b2, B3=b3, NB=1 << bits, B=bits, SHIFT=shift, BLOCK=block, ATOMIC_MAX=amax,
            ZERO_PART=(1 << b3) if (level == 2 and a3 > 0) else 0, num_warps=nw,
        )
    kt.compact_kernel[grid](
        pooled, kv_start, kv_end, hist, part, indices, Hkv, Lk, W, w_chunk, ppm, int(topk_floor),
        sel_splits, B2=b2, B3=b3, NB3=1 << b3, SPP=triton.next_power_of_2(sel_splits), BLOCK=block, num_warps=nw,
    )
    return indices


_FUSED_REFUSED: set = set()  # (G, device) whose fused selection grid the driver refused as cooperative


def _launch_select_fused(grid, scores, m, l, kv_start, kv_end, pooled, hist, part, indices, bar, Hkv, Lk, W, n_splits,
                         w_chunk, ppm, topk_floor, sel_splits, G, block, b2, b3, nw, a2, a3, device):
    kt.select_fused_kernel[grid](
        scores.values, scores.ref, m, l, kv_start, kv_end, pooled, hist, part, indices, bar,
        Hkv, Lk, W, n_splits, w_chunk, ppm, int(topk_floor), sel_splits,
        G=G, GS=triton.next_power_of_2(G), MG=scores.group, PB=_pool_block(block, triton.next_power_of_2(G)),
        SP=triton.next_power_of_2(n_splits), BLOCK=block, NB=kt.NBINS,
        B2=b2, B3=b3, SPP=triton.next_power_of_2(sel_splits), ATOMIC2=a2, ATOMIC3=a3,
        ZERO_PART=(1 << b3) if a3 > 0 else 0, num_warps=nw,
        **({"launch_cooperative_grid": True}
           if device.type == "cuda" else {}),
    )


def anchor(q, k, v, kv_start, kv_end, *, topk_fraction, topk_floor, scale=None, dense_output=False,
           paged: PagedKV | None = None, config: DecodeConfig = DEFAULT_CONFIG):
    """Anchor decode: Top-k of the group-pooled post-softmax scores (exact up to ties: pooled scores
    within 2^-14 relative of the threshold count as equal), then sparse attention over them
    (dense_output=True: the dense output, layer 0). Returns (out [B, Hq, 1, D], indices [B, Hkv, W]
    int32 with each row's topk_budget(kv_end - kv_start) indices first (keys above the threshold in key
    order, then threshold ties in key order), then -1). paged: K/V are paged caches (positions and
    indices logical)."""
    Hkv = k.shape[1] if paged is None else k.shape[2]
    scores, m, l, dense_out, n_splits = _split_pass(q, k, v, kv_start, kv_end, scale, write_scores=True,
                                                    acc_v=dense_output, paged=paged, config=config)
    indices = select(scores, m, l, n_splits, kv_start, kv_end, Hkv=Hkv, topk_fraction=topk_fraction,
                     topk_floor=topk_floor, config=config)
    if dense_output:
        out = dense_out
    else:
        out = sparse(q, k, v, indices, kv_start, kv_end, scale=scale, scores=scores,
                     budget=(topk_fraction, topk_floor), paged=paged, config=config)
    return out, indices
