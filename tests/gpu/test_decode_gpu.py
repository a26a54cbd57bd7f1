"""The Triton decode kernels on a GPU at real sizes (32 q-heads / 8 KV heads / d=128, 8K-128K, bf16).

Skipped without CUDA. Same rules as tests/test_kernels_decode.py: outputs against an fp32 reference by
the FlashAttention rule (max error at most twice a same-precision PyTorch run's, plus a floor),
selections by count / range / uniqueness and captured pooled attention mass. Also: the launchers never
synchronise with the host (torch sync debug mode "error") and replay correctly from a CUDA graph.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

if torch.cuda.is_available():
    import kascade.reference as R
    from kascade.ops import decode as D


@pytest.fixture(autouse=True)
def _config_from_env(monkeypatch):
    """KASCADE_DECODE_TUNING='{"sparse_num_stages": 5, ...}' runs every test with D.dense / anchor / sparse
    bound to that DecodeConfig (fields over the defaults; benchmarks/tune/gpu_decode_tune2.sh checks the
    launch variants this way). An unknown field is an error."""
    import dataclasses
    import functools
    import json
    import os

    overrides = json.loads(os.environ.get("KASCADE_DECODE_TUNING", "{}") or "{}")
    if not overrides:
        return
    fields = {f.name for f in dataclasses.fields(D.DecodeConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise KeyError(f"KASCADE_DECODE_TUNING: unknown DecodeConfig fields {sorted(unknown)}")
    cfg = dataclasses.replace(D.DEFAULT_CONFIG, **{k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in overrides.items()})
    for name in ("dense", "anchor", "sparse"):
        monkeypatch.setattr(D, name, functools.partial(getattr(D, name), config=cfg))


def make(B, Hq, Hkv, L, Dh, dtype, seed=0, spread=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(B, Hq, 1, Dh, device="cuda", generator=g) * spread).to(dtype)
    k = torch.randn(B, Hkv, L, Dh, device="cuda", generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, L, Dh, device="cuda", generator=g, dtype=dtype)
    return q, k, v


def lowp(q, k, v, allowed):
    B, Hq, _, Dh = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, Dh)
    s = torch.einsum("bhgd,bhkd->bhgk", qg, k) / math.sqrt(Dh)
    s = s.masked_fill(~allowed[:, :, None, :], -math.inf)
    return torch.einsum("bhgk,bhkd->bhgd", torch.softmax(s, -1), v).reshape(B, Hq, 1, Dh)


def allowed_from(indices, starts, ends, L):
    B, H, _ = indices.shape
    keys = torch.arange(L, device=indices.device)
    m = torch.zeros(B, H, L + 1, dtype=torch.bool, device=indices.device)
    m.scatter_(-1, torch.where(indices >= 0, indices.long(), L), True)
    m = m[..., :L]
    return m & (keys >= starts[:, None, None]) & (keys < ends[:, None, None])


def check_close(out, q, k, v, allowed, ref32):
    assert torch.isfinite(out).all()
    err = (out.float() - ref32).abs().max().item()
    base = (lowp(q, k, v, allowed).float() - ref32).abs().max().item()
    assert err <= 2 * base + 1e-3, f"error {err:.3g}, same-precision PyTorch {base:.3g}"


def check_selection(indices, q, k, starts, ends, frac, floor):
    B, Hq = q.shape[:2]
    Hkv = k.shape[1]
    G = Hq // Hkv
    for b in range(B):
        kb = R.topk_budget(int(ends[b] - starts[b]), frac, floor)
        real = indices[b, :, :kb]
        assert (indices[b, :, kb:] == -1).all()
        assert ((real >= starts[b]) & (real < ends[b])).all()
        assert (real.sort(-1).values.diff(dim=-1) > 0).all()
    ref = R.select_decode(q, k, starts, ends, topk_fraction=frac, topk_floor=floor)
    kw = dict(topk_fraction=frac, topk_floor=floor)
    got = R.selection_stats(q, k, indices, starts, ends, **kw)[0].reshape(B, Hkv, G).sum(-1)
    want = R.selection_stats(q, k, ref, starts, ends, **kw)[0].reshape(B, Hkv, G).sum(-1)
    assert (got >= want - 1e-4 * G).all(), (got - want).min()


@pytest.mark.parametrize("L", [8192, 32768, 131072])
@pytest.mark.parametrize("B,varied", [(2, False), (3, True)], ids=["full", "varied"])
def test_real_sizes_bf16(L, B, varied):
    Hq, Hkv, Dh = 32, 8, 128
    q, k, v = make(B, Hq, Hkv, L, Dh, torch.bfloat16, seed=L + B, spread=3.0)
    if varied:
        starts = torch.tensor([0, 1000, 37], device="cuda")[:B]
        ends = torch.tensor([L, L - 5000, L // 2 + 11], device="cuda")[:B]
    else:
        starts = torch.zeros(B, dtype=torch.int64, device="cuda")
        ends = torch.full((B,), L, dtype=torch.int64, device="cuda")
    frac, floor = 0.1, 128
    full = allowed_from(torch.arange(L, device="cuda", dtype=torch.int32).expand(B, Hkv, L), starts, ends, L)
    dense32 = R.dense_attention(q.float(), k.float(), v.float(), starts, ends)

    check_close(D.dense(q, k, v, starts, ends), q, k, v, full, dense32)
    out0, idx0 = D.anchor(q, k, v, starts, ends, topk_fraction=frac, topk_floor=floor, dense_output=True)
    check_close(out0, q, k, v, full, dense32)
    check_selection(idx0, q, k, starts, ends, frac, floor)
    out, idx = D.anchor(q, k, v, starts, ends, topk_fraction=frac, topk_floor=floor)
    check_selection(idx, q, k, starts, ends, frac, floor)
    sparse32 = R.sparse_attention(q.float(), k.float(), v.float(), idx, starts, ends)
    check_close(out, q, k, v, allowed_from(idx, starts, ends, L), sparse32)
    # a reuse layer: other q, K/V, the anchor's indices through a many-to-one head map
    q2, k2, v2 = make(B, Hq, Hkv, L, Dh, torch.bfloat16, seed=L + B + 1)
    mapped = idx[:, torch.tensor([0, 0, 1, 3, 3, 5, 7, 2], device="cuda")]
    out2 = D.sparse(q2, k2, v2, mapped, starts, ends)
    ref2 = R.sparse_attention(q2.float(), k2.float(), v2.float(), mapped, starts, ends)
    check_close(out2, q2, k2, v2, allowed_from(mapped, starts, ends, L), ref2)


@pytest.mark.parametrize("Hq,Hkv,Dh,dtype", [(16, 2, 128, torch.bfloat16), (28, 4, 64, torch.float16),
                                              (8, 8, 128, torch.float16), (16, 1, 64, torch.bfloat16)])
def test_geometries(Hq, Hkv, Dh, dtype):
    B, L = 2, 20000 + 17
    q, k, v = make(B, Hq, Hkv, L, Dh, dtype, seed=Hq * Hkv, spread=3.0)
    starts = torch.tensor([0, 333], device="cuda")
    ends = torch.tensor([L, L - 999], device="cuda")
    for frac in (0.1, 0.3):
        out, idx = D.anchor(q, k, v, starts, ends, topk_fraction=frac, topk_floor=128)
        check_selection(idx, q, k, starts, ends, frac, 128)
        ref = R.sparse_attention(q.float(), k.float(), v.float(), idx, starts, ends)
        check_close(out, q, k, v, allowed_from(idx, starts, ends, L), ref)


def test_no_host_sync_and_cuda_graph():
    B, Hq, Hkv, L, Dh = 2, 32, 8, 16384, 128
    q, k, v = make(B, Hq, Hkv, L, Dh, torch.bfloat16, seed=9, spread=3.0)
    starts = torch.tensor([0, 100], device="cuda")
    ends = torch.tensor([L, L - 100], device="cuda")
    kw = dict(topk_fraction=0.1, topk_floor=128)
    ref_out, ref_idx = D.anchor(q, k, v, starts, ends, **kw)  # compile outside sync-debug mode
    D.sparse(q, k, v, ref_idx, starts, ends)
    D.anchor(q, k, v, starts, ends, dense_output=True, **kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        D.anchor(q, k, v, starts, ends, **kw)
        D.anchor(q, k, v, starts, ends, dense_output=True, **kw)
        D.sparse(q, k, v, ref_idx, starts, ends)
        D.dense(q, k, v, starts, ends)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        D.anchor(q, k, v, starts, ends, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_idx = D.anchor(q, k, v, starts, ends, **kw)
    # new inputs in the same buffers: the replay must follow them
    q.copy_(make(B, Hq, Hkv, L, Dh, torch.bfloat16, seed=10, spread=3.0)[0])
    graph.replay()
    torch.cuda.synchronize()
    # the replay's result is a correct anchor layer for the new q (ties may be taken differently)
    check_selection(g_idx, q, k, starts, ends, 0.1, 128)
    ref = R.sparse_attention(q.float(), k.float(), v.float(), g_idx, starts, ends)
    check_close(g_out, q, k, v, allowed_from(g_idx, starts, ends, L), ref)
