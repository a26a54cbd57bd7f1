"""Triton helpers for vLLM's paged KV cache, shared by the kernels that read K/V.

Paged layout (vLLM): K and V caches [num_blocks, block_size, num_kv_heads, head_size]; each sequence b
owns the physical blocks block_table[b, 0..], in logical order; its keys are the logical positions
0 <= pos < seq_lens[b]. Logical position pos of row b lives at physical block
block_table[b, pos // block_size], slot pos % block_size.

The paged kernels are the decode kernels of :mod:`kascade.kernels.decode` and the rolling prefill
kernels of :mod:`kascade.kernels.prefill` compiled with ``PAGED=True``: everything (splits, scores and
pooled buffers, selection, indices) stays in logical positions, and only the K/V address of a key goes
through :func:`physical_slots` (prefill: also the packed varlen query rows, via query_start_loc).
Launchers: :mod:`kascade.ops.paged`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def physical_slots(n, mask, bt_row, PAGE: tl.constexpr):
    """(block, slot) of logical positions n of one row: block = bt_row[n // PAGE] (int64; loaded only
    where mask, else 0, so the caller must mask its K/V load too), slot = n % PAGE (PAGE a power of
    two). The K element at head h, dim d is then K + block * stride_block + slot * stride_slot
    + h * stride_head + d."""
    blk = tl.load(bt_row + n // PAGE, mask=mask, other=0).to(tl.int64)
    return blk, n % PAGE
