"""Launchers of the Triton prefill kernels (kascade.kernels.prefill): check inputs, allocate, launch.

Called by kascade.attention when Triton runs (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) and
Lq > 1. Shapes and conventions: kascade.reference.

* ``dense``: causal GQA flash attention (also the baseline of ``kascade bench prefill``).
* ``anchor``: (1) a flash pass for every query's log-sum-exp (layer 0: the dense output too);
  (2) per chunk of query tiles, the post-softmax probabilities of each tile x GQA group summed over
  its rows into a [B, Hkv, tiles_in_chunk, prefix] buffer (bounded by PrefillConfig.pool_buffer_bytes, never the
  whole [B, Hkv, L/T, L]), then (3) a radix select of each row's budget; (4) the sparse pass
  (skipped for layer 0).
* ``sparse``: each tile x GQA group attends to its gathered selected keys plus its own tile.

The internal launchers also take ``paged=PagedPrefill(...)``: the same kernels compiled with PAGED=True
for vLLM's packed varlen queries and paged KV cache (public entry points: kascade.ops.paged).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from ..budget import topk_budget
from ..kernels import prefill as K
from ..kernels import topk as kt
from ..validation import KascadeInputError
from ._launch import (  # noqa: F401 - HEAD_DIMS, MAX_GQA: the engine's kernel limits read them here
    HEAD_DIMS,
    LOG2E,
    MAX_GQA,
    check_head_map,
    check_kernel_inputs,
    dot_precision,
    next_pow2,
    pad16,
    qk_scale,
)

TILE_SIZES = (16, 32, 64)


@dataclass(frozen=True)
class PrefillConfig:
    """Block sizes and launch settings of the prefill launchers, passed explicitly (``config=``; default
    :data:`DEFAULT_CONFIG`: the fastest of `kascade bench prefill --tune` on an H100, bf16, 32/8/128,
    T=32, benchmarks/notes_prefill.md). Benchmarks and tests build variants with
    ``dataclasses.replace``. Per kernel: keys per block (BLOCK_N), pipeline stages, warps."""

    rows_per_program: int = 128  # M = query rows (tokens x heads of one GQA group) per flash/LSE program
    pool_rows_per_program: int = 256  # the pooling kernel keeps a whole tile x group up to this size
    pool_buffer_bytes: int = 1 << 30  # pooled-score buffer of one chunk of tiles
    select_block: int = 2048
    # The flash (dense output) pass takes 8 warps when its block has M * D >= 128 * 128, else 4.
    flash_block_n: int = 64
    flash_stages: int = 3
    lse_block_n: int = 128
    lse_stages: int = 2
    lse_warps: int = 8
    pool_block_n: int = 64
    pool_stages: int = 3
    pool_warps: int = 4  # blocks of up to 128 rows; larger ones by size, as the flash pass
    # Sparse: 8 warps capped at 128 registers (two programs, four warpgroups per SM; uncapped they take
    # 191 registers and one program per SM, and 4 warps spill): -6 % at 128K, -7 % at 32K vs 4 warps
    # (benchmarks/results/prefill_tune7_maxnreg.json). Blocks of fewer than 128 rows keep 4 warps, no cap.
    sparse_block_n: int = 64
    sparse_stages: int = 2
    sparse_warps: int = 8
    sparse_rows_per_program: int = 128
    sparse_maxnreg: int | None = 128  # register cap per thread (None: the compiler's choice)


DEFAULT_CONFIG = PrefillConfig()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_size: int | None = None) -> int:
    """Kernel-specific limits (the generic shape checks ran in kascade.attention). Returns G."""
    Lq = q.shape[2]
    if Lq < 2:
        raise KascadeInputError(f"prefill kernels take Lq > 1 queries per row, got Lq={Lq}")
    G = check_kernel_inputs(q, k, v, "prefill")
    if tile_size is not None and tile_size not in TILE_SIZES:
        raise KascadeInputError(f"prefill kernels support tile_size in {TILE_SIZES}, got {tile_size}")
    if max(t.numel() for t in (q, k, v)) >= 2**31:
        raise KascadeInputError("prefill kernels index with int32: each of q, k, v must have < 2^31 elements")
    return G


def _warps(M: int, D: int) -> int:
    return 8 if M * D >= 128 * 128 else 4


def _rows_info(kv_start: torch.Tensor, kv_end: torch.Tensor, Lq: int, lengths=None):
    """Host copies of the row lengths and whether any query is padding. The lengths are read back from
    the device (one sync) unless the caller knows them (a step plan does: kascade.engine.Step)."""
    if lengths is None:
        lengths = (kv_end - kv_start).tolist()
    return lengths, any(L < Lq for L in lengths)


@functools.lru_cache(maxsize=64)
def _tile_budgets_host(n_tiles: int, T: int, topk_fraction: float, topk_floor: int) -> tuple[int, ...]:
    """Per tile: its budget when it selects, -1 when its prefix fits the budget (dense tile)."""
    out = []
    for t in range(n_tiles):
        P = t * T
        kb = topk_budget(P, topk_fraction, topk_floor)
        out.append(-1 if P <= kb else kb)
    return tuple(out)


def tile_budgets(n_tiles: int, T: int, topk_fraction: float, topk_floor: int, device):
    """(host budgets per tile (-1: dense), the same on the device, index width W): W is the largest
    budget rounded up to 16 (extra slots stay -1), so one stride class serves every length (no
    recompile)."""
    host = _tile_budgets_host(n_tiles, T, topk_fraction, topk_floor)
    budgets = _tile_budgets(n_tiles, T, topk_fraction, topk_floor, device)
    return host, budgets, pad16(max([1] + [kb for kb in host if kb >= 0]))


def _call_rows(q, k, v, kv_start, kv_end, tile_size, lengths):
    """The checks and row geometry of a rolling-prefill call: (G, Hkv, lengths, pad_rows, n_tiles)."""
    G = _check(q, k, v, tile_size)
    lengths, pad_rows = _rows_info(kv_start, kv_end, q.shape[2], lengths)
    return G, k.shape[1], lengths, pad_rows, max(1, -(-max(lengths) // tile_size))


def _first_sparse_tile(host_budgets) -> int:
    """The first tile that selects (budgets grow with the prefix, so the sparse tiles are a suffix);
    len(host_budgets) when every tile is dense."""
    return next((t for t, kb in enumerate(host_budgets) if kb >= 0), len(host_budgets))


_DEVICE_BUDGETS: dict = {}


def _tile_budgets(n_tiles, T, topk_fraction, topk_floor, device):
    key = (n_tiles, T, float(topk_fraction), int(topk_floor), str(device))
    t = _DEVICE_BUDGETS.get(key)
    if t is None:
        t = torch.tensor(_tile_budgets_host(*key[:4]), dtype=torch.int32, device=device)
        if len(_DEVICE_BUDGETS) > 64:
            _DEVICE_BUDGETS.clear()
        _DEVICE_BUDGETS[key] = t
    return t


def _group_blocking(G: int, tokens: int, rows: int) -> tuple[int, int]:
    """(G_BLOCK, n_gblocks): heads of one group per program, so G_BLOCK * tokens <= rows when possible."""
    g_pad = next_pow2(G)
    g_block = max(1, min(g_pad, rows // tokens))
    return g_block, -(-G // g_block)


# --------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class PagedPrefill:
    """vLLM's layout for the kernels' PAGED variant (checked and built by kascade.ops.paged): q packed
    as [total_tokens, Hq, D], sequence b's queries at rows query_start_loc[b] .. query_start_loc[b+1]-1
    (the last of its seq_lens[b] keys); K/V caches [num_blocks, block_size, Hkv, D] read through
    block_table [B, max_blocks] int32. kv_start / kv_end passed with it are unused / seq_lens.
    max_query_len (host) bounds every q_len: it sizes the grids. block_table None: K/V were gathered
    from the pages into [B, Hkv, Lk, D] (kascade.ops.paged.gather_kv; any strides, head_size contiguous)
    and the kernels read them as the contiguous ones do (TABLE=False)."""

    block_table: torch.Tensor | None
    block_size: int
    query_start_loc: torch.Tensor
    max_query_len: int

    def n_slots(self, T: int) -> int:
        """Tiles of T a run of at most max_query_len consecutive positions can touch: the length of the
        per-sequence tile axis (counted from each sequence's first query tile) of the pooled buffer and
        of the indices."""
        return (self.max_query_len + T - 2) // T + 1


def _layout(q, k, v, kv_start, paged: PagedPrefill | None):
    """(B, Hq, Lq, Hkv, D, q/k/v strides as the kernels take them (batch, head, token), the pointers
    (query_start_loc, block_table), (block-table row stride, K block stride, V block stride), meta).
    Contiguous: the pointers are placeholders (never read) and the paged strides 0. Paged: Lq is
    max_query_len, batch strides are 0, the token stride of K/V is the cache's slot stride."""
    if paged is None:
        B, Hq, Lq, D = q.shape
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2))
        return B, Hq, Lq, k.shape[1], D, strides, (kv_start, kv_start), (0, 0, 0), {}
    _, Hq, D = q.shape
    B = paged.query_start_loc.shape[0] - 1
    bt = paged.block_table
    if bt is None:  # gathered K/V [B, Hkv, Lk, D]
        strides = (0, q.stride(1), q.stride(0), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                   v.stride(2))
        return (B, Hq, paged.max_query_len, k.shape[1], D, strides, (paged.query_start_loc, paged.query_start_loc),
                (0, 0, 0), dict(PAGED=True))
    strides = (0, q.stride(1), q.stride(0), 0, k.stride(2), k.stride(1), 0, v.stride(2), v.stride(1))
    return (B, Hq, paged.max_query_len, k.shape[2], D, strides, (paged.query_start_loc, bt),
            (bt.stride(0), k.stride(0), v.stride(0)), dict(PAGED=True, TABLE=True, PAGE=paged.block_size))


def _out_strides(out, paged):
    """(batch, head, token) strides of an output like q."""
    if paged is None:
        return out.stride(0), out.stride(1), out.stride(2)
    return 0, out.stride(1), out.stride(0)


# --------------------------------------------------------------------------------------------- dense
def _flash(q, k, v, kv_start, kv_end, scale, *, with_v: bool, store_lse: bool, pad_rows: bool,
           paged: PagedPrefill | None = None, config: PrefillConfig = DEFAULT_CONFIG):
    B, Hq, Lq, Hkv, D, strides, ptrs, pg_strides, pg_meta = _layout(q, k, v, kv_start, paged)
    G = Hq // Hkv
    c = config
    g_pad = next_pow2(G)
    block_t = min(128, max(16, c.rows_per_program // g_pad))
    g_block, n_gb = _group_blocking(G, block_t, c.rows_per_program)
    out = None
    if with_v:
        out = (torch.zeros if pad_rows or paged else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
    lse = None
    if store_lse:
        # paged: [Hq, total_tokens] (no batch axis: sequences are packed along the token axis)
        lse = _lse_buffer(B, Hq, Lq, q.device) if paged is None else _lse_buffer(1, Hq, q.shape[0], q.device)[0]
    o_arg = out if out is not None else q
    l_arg = lse if lse is not None else q
    l_strides = (0 if paged else l_arg.stride(0), l_arg.stride(0) if paged else l_arg.stride(1))
    M = g_block * block_t
    grid = ((triton.cdiv(Lq, block_t) + 1) * n_gb, B * Hkv)
    K._attn_fwd_kernel[grid](
        q, k, v, o_arg, l_arg, kv_start, kv_end, *ptrs,
        *strides, *_out_strides(o_arg, paged), *l_strides, *pg_strides,
        Lq, Hkv, G, n_gb, qk_scale(scale, D),
        D=D, G_BLOCK=g_block, BLOCK_T=block_t, BLOCK_N=c.flash_block_n if with_v else c.lse_block_n,
        WITH_V=with_v, STORE_LSE=store_lse, DOT_PREC=dot_precision(q.dtype),
        num_warps=_warps(M, D) if with_v else c.lse_warps,
        num_stages=c.flash_stages if with_v else c.lse_stages, **pg_meta,
    )
    return out, lse


def _lse_buffer(B: int, Hq: int, Lq: int, device) -> torch.Tensor:
    """[B, Hq, Lq] float32 of -inf whose row stride is a multiple of 16: the kernels' stride arguments
    then keep one divisibility class for every Lq (no recompile per prompt length)."""
    return torch.full((B, Hq, pad16(Lq)), float("-inf"), dtype=torch.float32, device=device)[:, :, :Lq]


def dense(q, k, v, kv_start, kv_end, *, scale=None, lengths=None, config: PrefillConfig = DEFAULT_CONFIG):
    """Causal GQA prefill attention, Triton flash kernel. q [B, Hq, Lq, D] -> out like q.
    lengths: host copy of kv_end - kv_start when the caller has it (saves a device sync)."""
    _check(q, k, v)
    _, pad_rows = _rows_info(kv_start, kv_end, q.shape[2], lengths)
    out, _ = _flash(q, k, v, kv_start, kv_end, scale, with_v=True, store_lse=False, pad_rows=pad_rows,
                    config=config)
    return out


# --------------------------------------------------------------------------------------------- sparse
def sparse(q, k, v, indices, kv_start, kv_end, *, topk_fraction, topk_floor, tile_size, scale=None,
           indices_from_anchor=False, head_map=None, lengths=None, config: PrefillConfig = DEFAULT_CONFIG):
    """Rolling sparse prefill (reuse layers).

    q [B, Hq, Lq, D] (Lq > 1, queries aligned to each row's end), k/v [B, Hkv, Lk, D], one of float16,
    bfloat16, float32, last dim contiguous; kv_start/kv_end int64 [B]; indices [B, Hkv, n_tiles, W]
    int32/int64 absolute key positions as ``anchor`` writes them, already mapped to this layer's heads:
    W at least the largest budget, each sparse tile's first budget slots hold its keys, -1 after them.
    Those slots are read without a mask (benchmarks/notes_prefill.md), so a -1 among them is refused
    (one pass over the slots; indices_from_anchor=True skips it for indices ``anchor`` just returned).
    head_map: int32 [Hkv] on the device: KV head h reads indices[:, head_map[h]] in the kernel (the
    reuse layer's head map, no copy); None: indices are already this layer's. lengths: host copy of
    kv_end - kv_start when the caller has it (saves a device sync).
    Returns out like q; padding queries are zero."""
    G, Hkv, lengths, pad_rows, n_tiles = _call_rows(q, k, v, kv_start, kv_end, tile_size, lengths)
    B, Lq, T = q.shape[0], q.shape[2], tile_size
    check_head_map(head_map, Hkv, q.device)
    if indices.dim() != 4 or indices.shape[0] != B or indices.shape[1] != Hkv:
        raise KascadeInputError(f"indices must be [B={B}, Hkv={Hkv}, n_tiles, W], got {tuple(indices.shape)}")
    if indices.shape[2] < n_tiles:
        raise KascadeInputError(f"indices have {indices.shape[2]} tiles, the longest row needs {n_tiles}")
    host, budgets, _ = tile_budgets(n_tiles, T, topk_fraction, topk_floor, q.device)
    kmax = max(host)
    if indices.shape[3] < kmax:
        raise KascadeInputError(f"indices have width {indices.shape[3]}, the budget needs {kmax}")
    if not indices_from_anchor:
        _check_budget_slots(indices, budgets, host, lengths, Lq, T)
    if indices.dtype != torch.int32 or indices.stride(-1) != 1:
        indices = indices.to(torch.int32).contiguous()
    out = (torch.zeros if pad_rows else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
    _launch_sparse(q, k, v, out, indices, budgets, kv_start, kv_end, G, T, scale, head_map, config=config)
    return out


def _check_budget_slots(indices, budgets, host, lengths, Lq, T, max_elems=1 << 26):
    """Each sparse tile with queries in this call must hold key positions (>= 0) in its first budget
    slots (budgets: per tile on the device, host: the same on the host). Checked per row over chunks
    of tiles, so the temporary masks stay small."""
    kmax = max(host)
    if kmax <= 0:
        return
    first_sparse = _first_sparse_tile(host)
    slots = torch.arange(kmax, device=indices.device)
    step = max(1, max_elems // (indices.shape[1] * kmax))
    for b, L in enumerate(lengths):
        q_pos = L - min(L, Lq)
        t0 = max(q_pos // T, first_sparse)
        t1 = -(-L // T)
        for lo in range(t0, t1, step):
            hi = min(t1, lo + step)
            need = slots[None, :] < budgets[lo:hi, None]
            holes = (indices[b, :, lo:hi, :kmax] < 0) & need
            if bool(holes.any()):
                h, t, slot = (int(x) for x in holes.nonzero()[0])
                raise KascadeInputError(
                    f"indices[{b}, {h}, {lo + t}, {slot}] is -1, inside tile {lo + t}'s budget of "
                    f"{host[lo + t]} keys: the prefill kernel needs every budget slot filled, as "
                    "anchor_attention returns them")


def _launch_sparse(q, k, v, out, indices, budgets, kv_start, kv_end, G, T, scale, head_map=None,
                   paged: PagedPrefill | None = None, physical: bool = False, config: PrefillConfig = DEFAULT_CONFIG):
    B, Hq, Lq, Hkv, D, strides, ptrs, pg_strides, pg_meta = _layout(q, k, v, kv_start, paged)
    if physical:  # indices are cache rows (ops.paged.paged_physical_indices): only with the block table
        assert pg_meta.get("TABLE"), "physical indices need the paged cache itself"
        pg_meta = {**pg_meta, "PHYSICAL": True}
    c = config
    g_block, n_gb = _group_blocking(G, T, c.sparse_rows_per_program)
    M = g_block * T
    warps, maxnreg = (c.sparse_warps, c.sparse_maxnreg) if M >= 128 else (4, None)
    n_slots = triton.cdiv(Lq, T) + 1 if paged is None else paged.n_slots(T)
    grid = (n_slots * n_gb, B * Hkv)
    K._sparse_kernel[grid](
        q, k, v, out, indices, (head_map if head_map is not None else budgets), budgets, kv_start, kv_end, *ptrs,
        *strides, *_out_strides(out, paged),
        indices.stride(0), indices.stride(1), indices.stride(2), *pg_strides,
        Lq, Hkv, G, n_gb, budgets.numel(), qk_scale(scale, D),
        D=D, G_BLOCK=g_block, T=T, BLOCK_N=c.sparse_block_n,
        DOT_PREC=dot_precision(q.dtype), MAPPED=head_map is not None, **pg_meta,
        num_warps=warps, num_stages=c.sparse_stages, **({"maxnreg": maxnreg} if maxnreg and q.is_cuda else {}),
    )


# --------------------------------------------------------------------------------------------- anchor
def anchor(q, k, v, kv_start, kv_end, *, topk_fraction, topk_floor, tile_size, scale=None, dense_output=False,
           lengths=None, config: PrefillConfig = DEFAULT_CONFIG):
    """Exact rolling Top-k selection (pooled post-softmax over tile x GQA group) and attention.

    Inputs as in ``sparse``. Returns (out like q, indices int32 [B, Hkv, n_tiles, kmax]) with
    n_tiles = ceil(max row length / T) and kmax the largest budget of a sparse tile: each sparse tile
    of this call holds exactly its budget of distinct prefix positions (ascending), -1 after; dense
    tiles and tiles without queries hold -1. dense_output=True (layer 0): out is dense attention.
    lengths: host copy of kv_end - kv_start when the caller has it (saves a device sync)."""
    G, Hkv, lengths, pad_rows, n_tiles = _call_rows(q, k, v, kv_start, kv_end, tile_size, lengths)
    B, Lq, T = q.shape[0], q.shape[2], tile_size
    host_budgets, budgets, kmax = tile_budgets(n_tiles, T, topk_fraction, topk_floor, q.device)
    indices = torch.full((B, Hkv, n_tiles, kmax), -1, dtype=torch.int32, device=q.device)

    out = lse = None
    # Layer 0's dense output and log-sum-exp from cuDNN (torch SDPA's cuDNN kernel, K/V expanded to the
    # query heads) where it applies (CUDA, bf16/fp16, no padding, Lq == Lk): it is the fastest dense
    # kernel on the H100 (~250 vs ~280 ms for our Triton flash pass at 128K). Ours otherwise.
    if dense_output and not pad_rows:
        out, lse = _dense_lse_cudnn(q, k, v, lengths, scale)
    if lse is None:
        out, lse = _flash(q, k, v, kv_start, kv_end, scale, with_v=dense_output, store_lse=True, pad_rows=pad_rows,
                          config=config)
    first_sparse = _first_sparse_tile(host_budgets)
    first_query_tile = min((L - min(L, Lq)) // T for L in lengths)
    tile_lo = max(first_sparse, first_query_tile)
    if tile_lo < n_tiles:
        _select(q, k, lse, indices, budgets, kv_start, kv_end, G, T, tile_lo, n_tiles, scale, config=config)
    if not dense_output:
        out = (torch.zeros if pad_rows else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
        _launch_sparse(q, k, v, out, indices, budgets, kv_start, kv_end, G, T, scale, config=config)
    return out, indices


def _expand_kv(k, v, G: int):
    """K/V repeated to the query heads (cuDNN's attention takes no GQA); unchanged when G == 1."""
    return (k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)) if G > 1 else (k, v)


def _cudnn_applies(q, k, lengths) -> bool:
    """cuDNN's causal attention serves this call: CUDA, half precision, one chunk (Lq == Lk), no padding."""
    Lk = k.shape[2]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[2] == Lk
            and all(L == Lk for L in lengths))


def dense_fastest(q, k, v, kv_start, kv_end, lengths, *, scale=None, config: PrefillConfig = DEFAULT_CONFIG):
    """Dense causal prefill by the fastest kernel that applies: torch SDPA's cuDNN kernel (measured fastest
    on the H100) for one unpadded chunk, else the Triton flash kernel (later chunks, left padding).
    lengths: host copy of kv_end - kv_start (the plan/run path has it)."""
    if _cudnn_applies(q, k, lengths):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kx, vx = _expand_kv(k, v, q.shape[1] // k.shape[1])
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, kx, vx, is_causal=True, scale=scale)
    return dense(q, k, v, kv_start, kv_end, scale=scale, lengths=lengths, config=config)


def _dense_lse_cudnn(q, k, v, lengths, scale):
    """(out, base-2 lse) from torch's cuDNN attention, or (None, None) where it does not apply."""
    B, Hq, Lq, D = q.shape
    if not _cudnn_applies(q, k, lengths):
        return None, None
    kx, vx = (t.contiguous() for t in _expand_kv(k, v, Hq // k.shape[1]))
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.contiguous(), kx, vx, None, True, 0.0, True, False, scale=qk_scale(scale, D) / LOG2E)
    except (RuntimeError, AttributeError):
        return None, None
    out, lse = res[0], res[1]
    if lse.numel() != B * Hq * Lq:
        return None, None
    lse2 = _lse_buffer(B, Hq, Lq, q.device)
    lse2.copy_(lse.reshape(B, Hq, Lq))
    return out, lse2.mul_(LOG2E)


def _select(q, k, lse, indices, budgets, kv_start, kv_end, G, T, tile_lo, n_tiles, scale,
            stages=("pool", "select"), pooled=None, paged: PagedPrefill | None = None,
            config: PrefillConfig = DEFAULT_CONFIG):
    """Pool and select tiles tile_lo..n_tiles-1, in chunks whose pooled buffer fits config.pool_buffer_bytes.
    (stages and pooled let the benchmark time the two kernels apart.) Returns the pooled buffer.
    paged: tiles are counted from each sequence's first query tile instead, tile_lo..paged.n_slots(T)-1
    (n_tiles still bounds the absolute tile: it is the length of budgets)."""
    B, Hq, Lq, Hkv, D, strides, ptrs, pg_strides, pg_meta = _layout(q, k, k, kv_start, paged)
    q_strides, k_strides = strides[:3], strides[3:6]
    tile_hi = n_tiles if paged is None else paged.n_slots(T)
    l_strides = (lse.stride(0), lse.stride(1)) if paged is None else (0, lse.stride(0))
    width = n_tiles * T
    per_tile = B * Hkv * width * 4  # sized for float32 either way
    c = config
    chunk = max(1, min(tile_hi - tile_lo, c.pool_buffer_bytes // per_tile))
    g_block, n_gb = _group_blocking(G, T, c.pool_rows_per_program)
    atomic = n_gb > 1
    alloc = torch.zeros if atomic else torch.empty
    # float16 pooled scores halve the bytes the select reads (measured faster than float32: bench prefill
    # --tune); atomics (several head blocks) add in fp32. The rounding to float16 (2^-11 relative) comes
    # before the selection and its tie rule (kernels/topk.py), and is within the captured-mass tolerance:
    # pooled values are <= G*T, far inside float16's range.
    pooled_dtype = torch.float32 if atomic else torch.float16
    if pooled is None:
        pooled = alloc((B, Hkv, chunk, width), dtype=pooled_dtype, device=q.device)
    M = g_block * T
    scale2 = qk_scale(scale, D)
    for lo in range(tile_lo, tile_hi, chunk):
        if "pool" in stages:
            if atomic and lo != tile_lo:
                pooled.zero_()
            K._pool_kernel[(chunk * n_gb, B * Hkv)](
                q, k, lse, pooled, budgets, kv_start, kv_end, *ptrs,
                *q_strides, *k_strides, *l_strides, pooled.stride(0), pooled.stride(1), pooled.stride(2),
                *pg_strides[:2],
                Lq, Hkv, G, n_gb, lo, n_tiles, scale2,
                D=D, G_BLOCK=g_block, T=T, BLOCK_N=c.pool_block_n, ATOMIC=atomic,
                DOT_PREC=dot_precision(q.dtype), num_warps=c.pool_warps if M <= 128 else _warps(M, D),
                num_stages=c.pool_stages, **pg_meta,
            )
        if "select" in stages:
            K._select_kernel[(chunk, B * Hkv)](
                pooled, indices, budgets, kv_start, kv_end, ptrs[0],
                pooled.stride(0), pooled.stride(1), pooled.stride(2),
                indices.stride(0), indices.stride(1), indices.stride(2),
                Lq, Hkv, lo, n_tiles, T,
                BLOCK=c.select_block, KEY16=pooled.dtype == torch.float16, B2=kt.B2, B3=kt.B3, num_warps=8,
                **({"PAGED": True} if paged is not None else {}),
            )
    return pooled
