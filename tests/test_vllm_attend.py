"""The vLLM backend's per-layer logic (kascade.integrations.vllm.attend) on paged caches under the CPU
interpreter, without vLLM: which kernel each layer of a step runs (decode or rolling prefill; layer 0,
anchor, reuse through the head map), the anchor indices carried to the reuse layers, and tensor
parallelism — each rank's heads of a TP=2 step, in shard mode and in gather mode (anchor indices
all-gathered, here by a stand-in for the TP group), equal the same heads of the single-process step."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

_ALREADY_COMPILED = any(m in sys.modules for m in ("kascade.kernels.decode", "kascade.kernels.prefill")) and \
    os.environ.get("TRITON_INTERPRET") != "1"
os.environ.setdefault("TRITON_INTERPRET", "1")
if _ALREADY_COMPILED or os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before the kernels load; run this file on its own", allow_module_level=True)

import torch  # noqa: E402

pytest.importorskip("triton")

from kascade import PlanError  # noqa: E402
from kascade.integrations import vllm as kv  # noqa: E402
from kascade.ops import paged as PG  # noqa: E402
from kascade.plan import ModelSpec, Plan  # noqa: E402
from kascade.plans import load_shipped  # noqa: E402

LAYERS, HQ, HKV, D, BS = 4, 8, 4, 64, 16
# layer 1 reuses anchor 0 with heads crossing TP=2 shards (0 <-> 2), layer 3 reuses anchor 2
HEAD_MAP = ((0, 1, 2, 3), (2, 1, 0, 3), (0, 1, 2, 3), (1, 0, 3, 2))


def _plan(head_map=HEAD_MAP):
    spec = ModelSpec("llama", LAYERS, HQ, HKV, D, name="tiny")
    return Plan(spec, (0, 2), head_map, topk_fraction=0.25, topk_floor=8, tile_size=16)


class Step:
    """One vLLM step: per layer, packed queries and a paged K/V cache (one block table for all layers)."""

    def __init__(self, seqs, seed=0, layout="nhd"):
        g = torch.Generator().manual_seed(seed)
        self.seqs = seqs  # [(seq_len, q_len)]
        need = [-(-L // BS) for L, _ in seqs]
        num_blocks = sum(need) + 3
        perm = torch.randperm(num_blocks, generator=g)
        self.block_table = torch.zeros((len(seqs), max(need) + 1), dtype=torch.int32)
        used = 0
        for b, n in enumerate(need):
            self.block_table[b, :n] = perm[used:used + n].to(torch.int32)
            used += n
        tokens = sum(n for _, n in seqs)
        self.q = [torch.randn(tokens + 2, HQ, D, generator=g) * 1.5 for _ in range(LAYERS)]  # +2: graph padding
        self.k = [torch.randn(num_blocks, BS, HKV, D, generator=g) for _ in range(LAYERS)]
        self.v = [torch.randn(num_blocks, BS, HKV, D, generator=g) for _ in range(LAYERS)]
        if layout == "vllm":  # vLLM's FlashAttention cache: K and V of a block side by side in one tensor
            pairs = [torch.stack(kv, dim=1).unbind(1) for kv in zip(self.k, self.v)]
            self.k, self.v = [k for k, _ in pairs], [v for _, v in pairs]
        q_lens = [n for _, n in seqs]
        self.md = SimpleNamespace(
            num_actual_tokens=tokens, max_query_len=max(q_lens), max_seq_len=max(L for L, _ in seqs),
            query_start_loc=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32),
            seq_lens=torch.tensor([L for L, _ in seqs], dtype=torch.int32), block_table=self.block_table)

    def heads(self, layer, lo_kv, hi_kv):
        """This layer's q and caches restricted to KV heads lo_kv .. hi_kv - 1 (one TP rank's shard)."""
        g = HQ // HKV
        if (lo_kv, hi_kv) == (0, HKV):  # all heads: the caches as laid out (a copy would lose vLLM's strides)
            return self.q[layer], self.k[layer], self.v[layer]
        return (self.q[layer][:, lo_kv * g:hi_kv * g].contiguous(), self.k[layer][:, :, lo_kv:hi_kv].contiguous(),
                self.v[layer][:, :, lo_kv:hi_kv].contiguous())


def _run(step, plan, maps, gather=None, kv_heads=(0, HKV)):
    """Every layer of the step through kv.attend; returns (outputs per layer, anchor indices per layer)."""
    kv._State.setup(plan, maps, gather, "cpu")
    outs, held = [], {}
    for layer in range(LAYERS):
        q, k, v = step.heads(layer, *kv_heads)
        out = torch.full_like(q, float("nan"))
        kv.attend(layer, q, k, v, step.md, D ** -0.5, out)
        outs.append(out)
        if plan.is_anchor(layer):
            held[layer] = kv._State.indices
    return outs, held


# (seq_len, q_len) per sequence, and how many leading sequences vLLM's reordered batch marks as decodes
STEPS = {"prefill+decode": ([(70, 70), (45, 1), (90, 30)], 0), "decodes first": ([(45, 1), (130, 1), (70, 70), (90, 30)], 2),
         "decode": ([(70, 1), (130, 1), (40, 1)], 3),
         # from kv.PHYSICAL_MIN_ROWS decode rows on, reuse layers read cache rows translated once per anchor
         "decode (physical rows)": ([(70, 1), (130, 1), (40, 1), (17, 1), (96, 1)], 5)}


def _step(kind, seed=0, layout="nhd"):
    seqs, nd = STEPS[kind]
    step = Step(seqs, seed=seed, layout=layout)
    step.md.num_decodes = nd
    return step


def _expected(step, plan):
    """Per layer, what the direct op calls give: decode kernels for the leading decodes, the rolling
    prefill for the rest (its query_start_loc shifted to its own rows), anchors' indices carried."""
    md, n, nd = step.md, len(step.seqs), step.md.num_decodes
    budget = dict(topk_fraction=plan.topk_fraction, topk_floor=plan.topk_floor)
    sizes = dict(max_query_len=md.max_query_len, max_seq_len=md.max_seq_len, tile_size=plan.tile_size)
    outs, held = [], None
    for layer in range(LAYERS):
        k, v = step.k[layer], step.v[layer]
        parts, got = [], [None, None]
        hm = torch.tensor(plan.head_map[layer], dtype=torch.int32)
        if nd:
            q = step.q[layer][:nd]
            t = (k, v, md.block_table[:nd], md.seq_lens[:nd])
            if plan.is_anchor(layer):
                out, got[0] = PG.paged_decode_anchor(q, *t, dense_output=layer == 0, scale=D ** -0.5, **budget)
            else:
                out = PG.paged_decode_sparse(q, *t, held[0], head_map=hm, scale=D ** -0.5,
                                             budget=(plan.topk_fraction, plan.topk_floor))
            parts.append(out)
        if nd < n:
            q = step.q[layer][nd:md.num_actual_tokens]
            t = (k, v, md.block_table[nd:], md.seq_lens[nd:], md.query_start_loc[nd:] - nd)
            if plan.is_anchor(layer):
                out, got[1] = PG.paged_prefill_anchor(q, *t, dense_output=layer == 0, scale=D ** -0.5, **budget,
                                                      **sizes)
            else:
                out = PG.paged_prefill_sparse(q, *t, held[1], head_map=hm, scale=D ** -0.5, validate_values=True,
                                              **budget, **sizes)
            parts.append(out)
        if plan.is_anchor(layer):
            held = got
        outs.append(torch.cat(parts))
    return outs


@pytest.mark.parametrize("kind", sorted(STEPS))
def test_each_layer_runs_its_kernel_with_its_anchor_indices(kind):
    step = _step(kind)
    plan = _plan()
    outs, _ = _run(step, plan, [list(r) for r in plan.head_map])
    rows = step.md.num_actual_tokens
    for layer, want in enumerate(_expected(step, plan)):
        torch.testing.assert_close(outs[layer][:rows], want, atol=0, rtol=0)
        assert bool(torch.isnan(outs[layer][rows:]).all()), "padding rows are left alone"
    # the reuse layers really read another head's indices: with identity maps layer 1's output changes
    ident = _plan(tuple((0, 1, 2, 3) for _ in range(LAYERS)))
    plain, _ = _run(step, ident, [list(r) for r in ident.head_map])
    assert float((plain[1][:rows] - outs[1][:rows]).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["decode (physical rows)", "prefill+decode"])
def test_vllm_cache_layout(kind, monkeypatch):
    """On vLLM's own cache layout (K and V of a block interleaved in one tensor), where the reuse layers read
    physical cache rows (decode from PHYSICAL_MIN_ROWS rows on, prefill always: each anchor translates once),
    every layer equals the direct op calls on the logical indices."""
    calls = []
    real = PG.paged_physical_indices
    monkeypatch.setattr(PG, "paged_physical_indices", lambda *a, **k: calls.append(1) or real(*a, **k))
    step = _step(kind, layout="vllm")
    assert step.k[0].stride(0) == 2 * BS * step.k[0].stride(1)
    plan = _plan()
    outs, _ = _run(step, plan, [list(r) for r in plan.head_map])
    assert len(calls) == len(plan.anchor_layers)
    rows = step.md.num_actual_tokens
    for layer, want in enumerate(_expected(step, plan)):
        torch.testing.assert_close(outs[layer][:rows], want, atol=0, rtol=0)


@pytest.mark.parametrize("kind,translations", [("decode", 0), ("decode (physical rows)", 2)])
def test_reuse_reads_cache_rows_from_enough_decode_rows(kind, translations, monkeypatch):
    """Each anchor's decode indices are translated to cache rows once (both anchors of the plan) when the
    batch has at least PHYSICAL_MIN_ROWS decodes, and never below."""
    calls = []
    real = PG.paged_physical_indices
    monkeypatch.setattr(PG, "paged_physical_indices", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan = _plan()
    assert len(plan.anchor_layers) == 2
    _run(_step(kind), plan, [list(r) for r in plan.head_map])
    assert len(calls) == translations


@pytest.mark.parametrize("kind", sorted(STEPS))
@pytest.mark.parametrize("mode", ["gather", "shard"])
def test_tp2_ranks_equal_the_single_process_heads(kind, mode):
    step = _step(kind, seed=1)
    plan = _plan() if mode == "gather" else _plan(tuple((0, 1, 2, 3) if j in (0, 2) else (1, 0, 3, 2) for j in range(LAYERS)))
    full_outs, full_idx = _run(step, plan, [list(r) for r in plan.head_map])
    per = HKV // 2
    for rank in range(2):
        maps, gather = kv.tp_head_maps(plan, 2, rank, "auto")
        assert gather == (mode == "gather")
        calls = []
        nd, n = step.md.num_decodes, len(step.seqs)
        calls_plan = [(j, p) for j in plan.anchor_layers for p, has in ((0, nd > 0), (1, nd < n)) if has]

        def all_gather(local, rank=rank):
            # the TP group's all-gather along KV heads: this rank's part must be what the single process
            # selected for these heads; the other rank's part is taken from the single-process run
            # anchors run in order; each gathers its decode part, then its prefill part (those it has)
            layer, part = calls_plan[len(calls)]
            calls.append((layer, part))
            full = full_idx[layer][part]
            torch.testing.assert_close(local, full[:, rank * per:(rank + 1) * per], atol=0, rtol=0)
            return full.clone()

        outs, _ = _run(step, plan, maps, all_gather if gather else None, kv_heads=(rank * per, (rank + 1) * per))
        assert calls == (calls_plan if gather else [])
        g = HQ // HKV
        for layer in range(LAYERS):
            rows = step.md.num_actual_tokens
            torch.testing.assert_close(outs[layer][:rows], full_outs[layer][:rows, rank * per * g:(rank + 1) * per * g],
                                       atol=0, rtol=0)


def test_layers_out_of_order_are_refused():
    step = _step("decode")
    plan = _plan()
    kv._State.setup(plan, [list(r) for r in plan.head_map], None, "cpu")
    q, k, v = step.heads(3, 0, HKV)
    with pytest.raises(PlanError, match="layer 3 reuses anchor layer 2"):
        kv.attend(3, q, k, v, step.md, D ** -0.5, torch.empty_like(q))


def test_tp_head_maps():
    llama = load_shipped("llama-3.1-8b-instruct")  # the authors' map crosses TP=2 shards (layer 20: head 0 -> 4)
    maps, gather = kv.tp_head_maps(llama, 2, 1, "auto")
    assert gather and len(maps) == 32 and maps[20] == list(llama.head_map[20][4:8])
    with pytest.raises(PlanError, match="crosses tensor-parallel shards"):
        kv.tp_head_maps(llama, 2, 0, "shard")
    ident = Plan.identity(llama.model, llama.anchor_layers)
    maps, gather = kv.tp_head_maps(ident, 4, 3, "auto")
    assert not gather and maps[5] == [0, 1]  # local head numbers of rank 3's two KV heads
    maps, gather = kv.tp_head_maps(ident, 4, 3, "gather")
    assert gather and maps[5] == [6, 7]
    assert kv.tp_head_maps(llama, 1, 0, "shard") == ([list(r) for r in llama.head_map], False)
    with pytest.raises(PlanError, match="KASCADE_TP_MODE must be one of"):
        kv.tp_head_maps(llama, 2, 0, "scatter")
    with pytest.raises(PlanError, match="does not divide"):
        kv.tp_head_maps(llama, 3, 0, "gather")


@pytest.mark.parametrize("limit,gathers", [(None, 2), (0, 0)], ids=["within-budget", "over-budget"])
def test_prefill_anchors_read_gathered_kv_within_the_byte_budget(limit, gathers, monkeypatch):
    """Anchor layers of prefill rows copy their K/V out of the pages (gather_kv=True) when the copy fits
    GATHER_MAX_BYTES, else read the pages; reuse layers always read the pages; the outputs are the same."""
    if limit is not None:
        monkeypatch.setattr(kv, "GATHER_MAX_BYTES", limit)
    flags = []
    for name in ("paged_prefill_anchor", "paged_prefill_sparse"):
        real = getattr(PG, name)
        monkeypatch.setattr(PG, name, lambda *a, _real=real, **k: flags.append(k.get("gather_kv", False))
                            or _real(*a, **k))
    step, plan = _step("prefill+decode"), _plan()
    outs, _ = _run(step, plan, [list(r) for r in plan.head_map])
    assert sum(flags) == gathers and len(flags) == LAYERS
    rows = step.md.num_actual_tokens
    for layer, want in enumerate(_expected(step, plan)):
        torch.testing.assert_close(outs[layer][:rows], want, atol=0, rtol=0)


def test_layer0_prefill_rows_take_a_given_dense_attention():
    """With layer0_dense (the backend passes vLLM's FlashAttention 3), layer 0's prefill rows take their dense
    output and log-sum-exp from it, written straight into the step's output rows, and only select: every
    layer's output and every anchor's indices equal those of Kascade's own flash pass. The decode rows and
    the other layers never call it."""
    step, plan = _step("decodes first"), _plan()
    maps = [list(r) for r in plan.head_map]
    want_outs, want_held = _run(step, plan, maps)
    calls = []

    def dense(q, k_cache, v_cache, qsl, seq_lens, block_table, max_query_len, max_seq_len, out):
        """A float64 reference of FA3's varlen call: out [tokens, Hq, D], natural-log lse [Hq, tokens]."""
        calls.append((q.shape[0], qsl.tolist(), seq_lens.tolist(), max_query_len, max_seq_len))
        lse = torch.empty(HQ, q.shape[0], dtype=torch.float32)
        kc, vc = k_cache.reshape(-1, HKV, D), v_cache.reshape(-1, HKV, D)
        for b, L in enumerate(seq_lens.tolist()):
            lo, hi = int(qsl[b]), int(qsl[b + 1])
            rows = (block_table[b].long()[:, None] * BS + torch.arange(BS)).reshape(-1)[:L]
            k = kc[rows].double().repeat_interleave(HQ // HKV, 1)
            v = vc[rows].double().repeat_interleave(HQ // HKV, 1)
            s = torch.einsum("nhd,lhd->hnl", q[lo:hi].double(), k) * D ** -0.5
            s.masked_fill_(torch.arange(L)[None, None] > torch.arange(L - (hi - lo), L)[None, :, None], float("-inf"))
            out[lo:hi] = torch.einsum("hnl,lhd->nhd", torch.softmax(s, -1), v).to(out.dtype)
            lse[:, lo:hi] = torch.logsumexp(s, -1).float()
        return lse

    kv._State.setup(plan, maps, None, "cpu")
    outs = []
    for layer in range(LAYERS):
        q, k, v = step.heads(layer, 0, HKV)
        out = torch.full_like(q, float("nan"))
        kv.attend(layer, q, k, v, step.md, D ** -0.5, out, layer0_dense=dense if layer == 0 else None)
        outs.append(out)
        if layer == 0:
            got0 = kv._State.indices
    nd, rows = step.md.num_decodes, step.md.num_actual_tokens
    assert calls == [(rows - nd, [0, 70, 100], [70, 90], 70, 130)]
    assert torch.equal(got0[1], want_held[0][1]) and torch.equal(got0[0], want_held[0][0])
    for layer in range(LAYERS):
        torch.testing.assert_close(outs[layer][:rows], want_outs[layer][:rows], atol=1e-5, rtol=1e-5)
