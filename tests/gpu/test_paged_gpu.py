"""The paged-KV decode kernels (kascade.ops.paged) on a GPU at real sizes, bf16.

Skipped without CUDA. A contiguous cache is scattered into a vLLM paged cache through a random block
table (slots no sequence owns hold NaN); the paged ops must give exactly the contiguous ops' results
on the same keys (same splits and arithmetic, only the addresses differ) and pass the reference checks
of test_decode_gpu.py. Also: no host synchronisation, and a correct CUDA-graph replay.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

if torch.cuda.is_available():
    import kascade.reference as R
    from kascade.ops import decode as D
    from kascade.ops import paged as P

    from test_decode_gpu import allowed_from, check_close, check_selection


def make_paged(B, Hq, Hkv, lens, Dh, block_size, dtype, seed=0, spread=1.0, extra=7):
    g = torch.Generator(device="cuda").manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    max_blocks = max(need) + 1
    L = max_blocks * block_size
    q = (torch.randn(B, Hq, Dh, device="cuda", generator=g) * spread).to(dtype)
    k = torch.randn(B, Hkv, L, Dh, device="cuda", generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, L, Dh, device="cuda", generator=g, dtype=dtype)
    num_blocks = sum(need) + extra
    perm = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32)
    kc = torch.full((num_blocks, block_size, Hkv, Dh), float("nan"), device="cuda", dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    bt = torch.full((B, max_blocks), -1, dtype=torch.int32, device="cuda")
    used = 0
    for b, n in enumerate(need):
        phys = perm[used:used + n]
        used += n
        bt[b, :n] = phys
        kb = k[b, :, : n * block_size].reshape(Hkv, n, block_size, Dh).permute(1, 2, 0, 3)
        vb = v[b, :, : n * block_size].reshape(Hkv, n, block_size, Dh).permute(1, 2, 0, 3)
        kc[phys.long()] = kb
        vc[phys.long()] = vb
        tail = n * block_size - lens[b]
        if tail:
            kc[int(phys[-1]), block_size - tail:] = float("nan")
            vc[int(phys[-1]), block_size - tail:] = float("nan")
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return q, k, v, kc, vc, bt, seq_lens


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("B,lens", [(1, [32768]), (3, [32768, 20007, 1003])], ids=["b1", "b3-varied"])
def test_paged_real_sizes_bf16(block_size, B, lens):
    Hq, Hkv, Dh = 32, 8, 128
    frac, floor = 0.1, 128
    q, k, v, kc, vc, bt, seq_lens = make_paged(B, Hq, Hkv, lens, Dh, block_size, torch.bfloat16, seed=B,
                                               spread=3.0)
    P.check_paged_values(kc, bt, seq_lens)
    starts = torch.zeros(B, dtype=torch.int64, device="cuda")
    ends = seq_lens.long()
    q4 = q[:, :, None]
    L = k.shape[2]

    dense_c = D.dense(q4, k, v, starts, ends)
    dense_p = P.paged_decode_dense(q, kc, vc, bt, seq_lens)
    assert torch.equal(dense_p, dense_c[:, :, 0])
    full = allowed_from(torch.arange(L, device="cuda", dtype=torch.int32).expand(B, Hkv, L), starts, ends, L)
    check_close(dense_p[:, :, None], q4, k, v, full, R.dense_attention(q4.float(), k.float(), v.float(), starts, ends))

    for dense_output in (False, True):
        out_c, idx_c = D.anchor(q4, k, v, starts, ends, topk_fraction=frac, topk_floor=floor,
                                dense_output=dense_output)
        out_p, idx_p = P.paged_decode_anchor(q, kc, vc, bt, seq_lens, topk_fraction=frac, topk_floor=floor,
                                             dense_output=dense_output)
        assert torch.equal(idx_p, idx_c)
        assert torch.equal(out_p, out_c[:, :, 0])
    check_selection(idx_p, q4, k, starts, ends, frac, floor)
    out_p, idx_p = P.paged_decode_anchor(q, kc, vc, bt, seq_lens, topk_fraction=frac, topk_floor=floor)
    ref = R.sparse_attention(q4.float(), k.float(), v.float(), idx_p, starts, ends)
    check_close(out_p[:, :, None], q4, k, v, allowed_from(idx_p, starts, ends, L), ref)

    # a reuse layer: other q, the anchor's indices through a many-to-one head map
    q2 = torch.randn_like(q)
    head_map = torch.tensor([0, 0, 1, 3, 3, 5, 7, 2], dtype=torch.int32, device="cuda")
    out2 = P.paged_decode_sparse(q2, kc, vc, bt, seq_lens, idx_p, head_map=head_map)
    mapped = idx_p[:, head_map.long()]
    assert torch.equal(out2, D.sparse(q2[:, :, None], k, v, mapped, starts, ends)[:, :, 0])
    ref2 = R.sparse_attention(q2[:, :, None].float(), k.float(), v.float(), mapped, starts, ends)
    check_close(out2[:, :, None], q2[:, :, None], k, v, allowed_from(mapped, starts, ends, L), ref2)


def test_paged_no_host_sync_and_cuda_graph():
    B, Hq, Hkv, Dh = 2, 32, 8, 128
    lens = [16384, 9000 + 5]
    q, k, v, kc, vc, bt, seq_lens = make_paged(B, Hq, Hkv, lens, Dh, 16, torch.bfloat16, seed=9, spread=3.0)
    kw = dict(topk_fraction=0.1, topk_floor=128)
    _, idx = P.paged_decode_anchor(q, kc, vc, bt, seq_lens, **kw)  # compile outside sync-debug mode
    P.paged_decode_anchor(q, kc, vc, bt, seq_lens, dense_output=True, **kw)
    P.paged_decode_sparse(q, kc, vc, bt, seq_lens, idx)
    P.paged_decode_dense(q, kc, vc, bt, seq_lens)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        P.paged_decode_anchor(q, kc, vc, bt, seq_lens, **kw)
        P.paged_decode_anchor(q, kc, vc, bt, seq_lens, dense_output=True, **kw)
        P.paged_decode_sparse(q, kc, vc, bt, seq_lens, idx)
        P.paged_decode_dense(q, kc, vc, bt, seq_lens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        P.paged_decode_anchor(q, kc, vc, bt, seq_lens, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_idx = P.paged_decode_anchor(q, kc, vc, bt, seq_lens, **kw)
    # a new query and a longer second sequence in the same buffers: the replay must follow them
    q.copy_(torch.randn_like(q) * 3)
    seq_lens[1] = 9000 + 5 + 3  # fills its last block (NaN there until now: write those slots)
    phys = int(bt[1, (9000 + 5) // 16])
    kc[phys, (9000 + 5) % 16:] = torch.randn_like(kc[phys, (9000 + 5) % 16:])
    vc[phys, (9000 + 5) % 16:] = torch.randn_like(vc[phys, (9000 + 5) % 16:])
    graph.replay()
    torch.cuda.synchronize()
    out, idx = P.paged_decode_anchor(q, kc, vc, bt, seq_lens, **kw)
    assert torch.equal(g_idx, idx) and torch.equal(g_out, out)
    # and that result is right on the contiguous keys of the new state
    L = bt.shape[1] * 16
    k2 = torch.empty(B, Hkv, L, Dh, device="cuda", dtype=kc.dtype)
    v2 = torch.empty_like(k2)
    pos = torch.arange(L, device="cuda")
    for b in range(B):
        rows = bt[b, (pos // 16).clamp(max=bt.shape[1] - 1)].clamp(min=0).long() * 16 + pos % 16
        k2[b] = kc.reshape(-1, Hkv, Dh)[rows].transpose(0, 1)
        v2[b] = vc.reshape(-1, Hkv, Dh)[rows].transpose(0, 1)
    k2, v2 = torch.nan_to_num(k2), torch.nan_to_num(v2)  # past each sequence: never read
    starts, ends = torch.zeros(B, dtype=torch.int64, device="cuda"), seq_lens.long()
    check_selection(g_idx, q[:, :, None], k2, starts, ends, 0.1, 128)
    ref = R.sparse_attention(q[:, :, None].float(), k2.float(), v2.float(), g_idx, starts, ends)
    check_close(g_out[:, :, None], q[:, :, None], k2, v2, allowed_from(g_idx, starts, ends, L), ref)


@pytest.mark.parametrize("chunk", [None, 1024], ids=["whole", "last-chunk"])
def test_paged_prefill_layer0_from_given_dense(chunk):
    """Layer 0 with dense=(out, natural-log lse), as FlashAttention 3 returns them, compiled at a real size: the
    given output comes back, the selection captures the same attention mass as the one from the op's own
    flash pass (mean over the queries)."""
    L, Hq, Hkv, Dh, bs, T = 4096, 32, 8, 128, 16, 32
    n = L if chunk is None else chunk
    _, k, _, kc, vc, bt, seq_lens = make_paged(1, Hq, Hkv, [L], Dh, bs, torch.bfloat16, seed=3)
    g = torch.Generator(device="cuda").manual_seed(4)
    qc = (torch.randn(n, Hq, Dh, device="cuda", generator=g) * 3).to(torch.bfloat16)  # peaked softmaxes
    qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    kw = dict(max_query_len=n, max_seq_len=L, topk_fraction=0.1, topk_floor=128, tile_size=T)
    out, idx = P.paged_prefill_anchor(qc, kc, vc, bt, seq_lens, qsl, dense_output=True, **kw)
    kx = k[0, :, :L].float().repeat_interleave(Hq // Hkv, 0)  # [Hq, L, D]
    s = qc.float().transpose(0, 1) @ kx.transpose(1, 2) / Dh ** 0.5  # [Hq, n, L]
    s.masked_fill_(torch.arange(L, device="cuda")[None, :] > torch.arange(L - n, L, device="cuda")[:, None],
                   float("-inf"))
    lse = torch.logsumexp(s, dim=-1).contiguous()  # [Hq, n]
    given = torch.empty_like(out)
    got_out, got = P.paged_prefill_anchor(qc, kc, vc, bt, seq_lens, qsl, dense_output=True, dense=(given, lse), **kw)
    assert got_out is given
    first = (L - n) // T  # the chunk's first tile
    q_ref = qc.transpose(0, 1)[None]
    ks, ke = torch.zeros(1, dtype=torch.int64, device="cuda"), torch.full((1,), L, dtype=torch.int64, device="cuda")
    masses = []
    for sel in (idx, got):
        full = torch.full((1, Hkv, L // T, sel.shape[3]), -1, dtype=torch.int32, device="cuda")
        full[0, :, first:] = sel[0, :, : L // T - first]
        masses.append(R.selection_stats(q_ref, k[:, :, :L], full, ks, ke, topk_fraction=0.1, topk_floor=128,
                                        tile_size=T)[0])
    # near-ties may swap a key (the two log-sum-exps differ in the last bits): compare the mass, not the indices
    assert abs(float(masses[1].mean()) - float(masses[0].mean())) < 1e-3
    # a real selection: 10 % of the keys hold ~0.44-0.48 of the mass here (H100), uniform scores would give ~0.1
    assert float(masses[0].mean()) > 0.3


def test_paged_physical_rows_on_vllm_layout_and_cuda_graph():
    """Reuse layers reading physical cache rows on vLLM's cache (one [num_blocks, 2, block_size, Hkv, D]
    tensor: K and V of a block side by side), compiled at real sizes: decode (5 rows, as the backend runs from
    PHYSICAL_MIN_ROWS on, the translation and the reuse layer captured in a CUDA graph and replayed) and a
    prefill chunk give exactly the block-table path's outputs."""
    B, Hq, Hkv, Dh, bs = 5, 32, 8, 128, 16
    lens = [32768, 20007, 1003, 4096, 9001]
    q, _, _, kc0, vc0, bt, seq_lens = make_paged(B, Hq, Hkv, lens, Dh, bs, torch.bfloat16, seed=11, spread=3.0)
    kc, vc = torch.stack([kc0, vc0], dim=1).unbind(1)  # vLLM's FlashAttention layout
    del kc0, vc0
    kw = dict(topk_fraction=0.1, topk_floor=128)
    _, idx = P.paged_decode_anchor(q, kc, vc, bt, seq_lens, **kw)
    head_map = torch.tensor([0, 0, 1, 3, 3, 5, 7, 2], dtype=torch.int32, device="cuda")
    q2 = torch.randn_like(q)
    budget = (0.1, 128)
    want = P.paged_decode_sparse(q2, kc, vc, bt, seq_lens, idx, head_map=head_map, budget=budget)
    phys = P.paged_physical_indices(idx, bt, seq_lens, bs)
    got = P.paged_decode_sparse(q2, kc, vc, bt, seq_lens, phys, head_map=head_map, budget=budget, physical=True)
    assert torch.equal(got, want) and bool(torch.isfinite(got).all())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        P.paged_physical_indices(idx, bt, seq_lens, bs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_phys = P.paged_physical_indices(idx, bt, seq_lens, bs)
        g_out = P.paged_decode_sparse(q2, kc, vc, bt, seq_lens, g_phys, head_map=head_map, budget=budget,
                                      physical=True)
    q2.copy_(torch.randn_like(q2))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g_out, P.paged_decode_sparse(q2, kc, vc, bt, seq_lens, idx, head_map=head_map, budget=budget))
    # prefill: the last 1024 queries of sequence 3 (4096 keys), as a chunk
    n, T = 1024, 32
    g = torch.Generator(device="cuda").manual_seed(12)
    qc = (torch.randn(n, Hq, Dh, device="cuda", generator=g) * 3).to(torch.bfloat16)
    qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    pk = dict(max_query_len=n, max_seq_len=4096, tile_size=T, **kw)
    args = (qc, kc, vc, bt[3:4].contiguous(), seq_lens[3:4].contiguous(), qsl)
    _, pidx = P.paged_prefill_anchor(*args, gather_kv=True, **pk)
    want = P.paged_prefill_sparse(*args, pidx, head_map=head_map, **pk)
    P.paged_physical_indices(pidx, args[3], args[4], bs, out=pidx)
    got = P.paged_prefill_sparse(*args, pidx, head_map=head_map, physical=True, validate_values=True, **pk)
    assert torch.equal(got, want) and bool(torch.isfinite(got).all())
