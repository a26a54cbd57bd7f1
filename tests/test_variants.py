"""The reuse-gap variants (issue 14): selections checked against brute-force definitions and invariants.

* sinks + window: exactly k keys, sinks and window always in, the rest the Top-k of the others;
* per-layer budgets: integer budgets with exactly the global mean, each within [1, L], near its share;
* top-p: the minimal set holding p (removing its weakest key drops below p), floor and cap respected;
* the eval methods attend what these functions select (anchors) and the mapped sets (reuse layers);
* plan validation of layer_budget_scale and calibration producing it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from kascade import ModelSpec, Plan, reference
from kascade.baselines import is_method, make_method, needs_plan
from kascade.baselines._common import decode_probs, masked_decode_attention
from kascade.budget import topk_budget
from kascade.plan import PlanError
from kascade.validation import KascadeInputError
from kascade import variants as V

SPEC = ModelSpec(architecture="tiny", num_layers=8, num_heads=6, num_kv_heads=2, head_dim=16, name="tiny")
SCALES = (1.0, 1.5, 1.25, 0.5, 1.0, 0.75, 0.5, 1.5)
PLAN = Plan(
    model=SPEC,
    anchor_layers=(0, 3, 6),
    head_map=tuple((0, 1) if j in (0, 3, 6) else ((1, 0) if j % 2 else (0, 0)) for j in range(8)),
    layer_budget_scale=SCALES,
)


def _rows(B=3, H=2, Lk=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    pooled = torch.rand(B, H, Lk, generator=g) ** 4  # peaky, no ties
    kv_start = torch.tensor([0, 17, 40])[:B]
    kv_end = torch.tensor([Lk, Lk - 5, 260])[:B]
    keys = torch.arange(Lk)
    valid = (keys >= kv_start[:, None]) & (keys < kv_end[:, None])
    return pooled * valid[:, None], kv_start, kv_end


def _sets(indices):
    return [[set(int(i) for i in indices[b, h] if i >= 0) for h in range(indices.shape[1])]
            for b in range(indices.shape[0])]


# ----------------------------------------------------------------------------------- sinks + window
@pytest.mark.parametrize("sinks,window", [(4, 32), (16, 64), (0, 0), (4, 0), (0, 20), (200, 200)])
def test_sinks_window_selection(sinks, window):
    pooled, s, e = _rows()
    budgets = topk_budget(e - s, 0.1, 40)
    idx = V.select_sinks_window(pooled, s, e, budgets, sinks, window)
    for b, row in enumerate(_sets(idx)):
        k, L, s0, e0 = int(budgets[b]), int(e[b] - s[b]), int(s[b]), int(e[b])
        n_sink = min(sinks, k)
        n_win = min(window, k - n_sink)
        forced = set(range(s0, s0 + n_sink)) | set(range(e0 - n_win, e0))
        for h, got in enumerate(row):
            assert len(got) == k == int((idx[b, h] >= 0).sum())  # exactly the budget, no duplicates
            assert all(s0 <= i < e0 for i in got)
            assert forced <= got
            others = sorted((i for i in range(s0, e0) if i not in forced), key=lambda i: -float(pooled[b, h, i]))
            assert got - forced == set(others[: k - len(forced)])  # brute-force Top-k of the rest
        assert L >= k


def test_sinks_window_short_row_is_all_keys():
    pooled, s, e = _rows()
    e = s + 30
    idx = V.select_sinks_window(pooled, s, e, torch.full((3,), 30), 4, 32)
    for b, row in enumerate(_sets(idx)):
        assert all(got == set(range(int(s[b]), int(e[b]))) for got in row)


# ----------------------------------------------------------------------------------- per-layer budgets
@pytest.mark.parametrize("seed", range(6))
def test_layer_budgets_mean_is_exact(seed):
    g = torch.Generator().manual_seed(seed)
    n = 24
    raw = torch.rand(n - 1, generator=g) * 3 + 0.05
    scales = [1.0] + (raw / raw.mean()).tolist()
    for k, L in ((205, 2048), (128, 1000), (300, 400), (7, 9), (1, 1)):
        out = V.layer_budgets(k, L, scales)
        assert len(out) == n and out[0] == k
        assert sum(out[1:]) == (n - 1) * k  # the average stays the global budget, exactly
        assert all(1 <= x <= L for x in out)
        capped = [j for j in range(1, n) if out[j] == L]
        if not capped:  # no cap binding: every layer within one key of its share
            assert all(abs(out[j] - scales[j] * k) < 1 for j in range(1, n)), (k, L)


def test_layer_budgets_cap_redistributes_in_proportion():
    out = V.layer_budgets(100, 150, [1.0, 3.0, 0.5, 0.5])  # layer 1 wants 300 > 150
    assert out == [100, 150, 75, 75]


def test_scales_from_reuse():
    sim = [1.0, 0.6, 0.7, 1.0, 0.8, 1.0, 0.9, 0.95, 0.5]
    x = V.scales_from_reuse(sim, lo=0.5, hi=2.0)
    assert x[0] == 1.0 and len(x) == len(sim)
    assert abs(sum(x[1:]) / (len(x) - 1) - 1.0) < 1e-5
    assert all(0.5 - 1e-5 <= v <= 2.0 + 1e-5 for v in x[1:])
    order = sorted(range(1, len(sim)), key=lambda j: sim[j])
    assert all(x[a] >= x[b] - 1e-9 for a, b in zip(order, order[1:]))  # less captured -> more keys
    tight = V.scales_from_reuse(sim, lo=0.9, hi=1.1)
    assert all(0.9 - 1e-5 <= v <= 1.1 + 1e-5 for v in tight[1:])
    Plan(model=ModelSpec("t", len(sim), 2, 1, 4), anchor_layers=(0,), head_map=((0,),) * len(sim),
         layer_budget_scale=tuple(x))  # a valid plan field


# ----------------------------------------------------------------------------------- top-p
def _brute_top_p(x: torch.Tensor, p: float) -> int:
    vals = sorted(x.tolist(), reverse=True)
    total = sum(vals)
    acc = 0.0
    for n, v in enumerate(vals, 1):
        acc += v
        if acc >= p * total:
            return n
    return len(vals)


@pytest.mark.parametrize("p", [0.5, 0.8, 0.9, 0.99, 1.0])
def test_top_p_is_minimal_and_clamped(p):
    pooled, s, e = _rows()
    L = e - s
    for lo_f, hi_f, floor in ((0.0001, 1.0, 1), (0.05, 0.2, 8), (0.02, 0.3, 40)):
        k_min, k_max = topk_budget(L, lo_f, floor), topk_budget(L, hi_f, floor)
        idx, counts = V.select_top_p(pooled, s, e, p, k_min, k_max)
        for b, row in enumerate(_sets(idx)):
            s0, e0 = int(s[b]), int(e[b])
            for h, got in enumerate(row):
                x = pooled[b, h, s0:e0].double()
                n = len(got)
                assert n == int(counts[b, h])
                assert int(k_min[b]) <= n <= int(k_max[b])
                want = min(max(_brute_top_p(x, p), int(k_min[b])), int(k_max[b]))
                assert n == want, (p, b, h, n, want)
                top = torch.topk(x, n).indices + s0
                assert got == set(top.tolist())  # the n largest
                mass = float(x[[i - s0 for i in got]].sum())
                total = float(x.sum())
                if n < int(k_max[b]):
                    assert mass >= p * total * (1 - 1e-9)  # holds p ...
                if n > int(k_min[b]):  # ... and is minimal: without its weakest key it would not
                    weakest = min(float(x[i - s0]) for i in got)
                    assert mass - weakest < p * total


# ----------------------------------------------------------------------------------- the eval methods
def _qkv(L=300, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 6, 1, 16, generator=g) * 2
    k = torch.randn(B, 2, L, 16, generator=g) * 2
    v = torch.randn(B, 2, L, 16, generator=g)
    return q, k, v


def _pass(method, q, k, v):
    """One decode pass over all layers with the same q/k/v (anchors select, reuse layers map)."""
    outs = {}
    for layer in range(SPEC.num_layers):
        outs[layer] = method(layer, q, k, v)
    return outs


def test_sinks_window_method_attends_sinks_window_and_budget():
    q, k, v = _qkv()
    L = k.shape[2]
    m = make_method("kascade_sinks_window:sinks=5,window=20", PLAN, SPEC, 0.1, 16, record_selection=True)
    assert m.opts == {"sinks": 5, "window": 20}
    _pass(m, q, k, v)
    kb = topk_budget(L, 0.1, 16)
    for layer in range(1, SPEC.num_layers):
        keep = m.last_selection[layer][0]  # [Hq, L]
        assert (keep.sum(-1) == kb).all()
        assert keep[:, :5].all() and keep[:, L - 20:].all()


def test_layer_budget_method_budgets_and_prefixes():
    q, k, v = _qkv()
    L = k.shape[2]
    m = make_method("kascade_layer_budget", PLAN, SPEC, 0.1, 16, record_selection=True)
    outs = _pass(m, q, k, v)
    kb = topk_budget(L, 0.1, 16)
    want = V.layer_budgets(kb, L, SCALES)
    counts = [int(m.last_selection[j][0, 0].sum()) for j in range(1, 8)]
    assert counts == want[1:]
    assert sum(counts) == 7 * kb  # equal attended keys on average
    # independent: layer j attends the Top-k_j of its anchor's pooled scores, mapped to its KV head
    pooled = decode_probs(q, k, torch.zeros(1, dtype=torch.long), torch.full((1,), L), 0.25).reshape(1, 2, 3, L).sum(2)
    for j in range(1, 8):
        a = PLAN.anchor_of(j)  # same q/k every layer here, so the anchor's scores are these
        for h in range(2):
            g = PLAN.head_map[j][h]
            top = set(torch.topk(pooled[0, g], want[j]).indices.tolist())
            got = set(torch.nonzero(m.last_selection[j][0, h * 3]).flatten().tolist())
            assert got == top, (j, h, a)
        keep = m.last_selection[j]
        torch.testing.assert_close(outs[j], masked_decode_attention(q, k, v, keep, 0.25), rtol=1e-4, atol=1e-5)


def test_layer_budget_method_needs_scales():
    plain = Plan(model=SPEC, anchor_layers=PLAN.anchor_layers, head_map=PLAN.head_map)
    with pytest.raises(PlanError, match="layer_budget_scale"):
        make_method("kascade_layer_budget", plain, SPEC)


def test_top_p_method_sets_and_reuse():
    q, k, v = _qkv(L=400)
    L = k.shape[2]
    m = make_method("kascade_top_p:p=0.7,min=0.05,max=0.5", PLAN, SPEC, 0.1, 16, record_selection=True)
    _pass(m, q, k, v)
    pooled = decode_probs(q, k, torch.zeros(1, dtype=torch.long), torch.full((1,), L), 0.25).reshape(1, 2, 3, L).sum(2)
    lo, hi = topk_budget(L, 0.05, 16), topk_budget(L, 0.5, 16)
    for j in range(1, 8):
        for h in range(2):
            g = PLAN.head_map[j][h]
            n = min(max(_brute_top_p(pooled[0, g].double(), 0.7), lo), hi)
            got = set(torch.nonzero(m.last_selection[j][0, h * 3]).flatten().tolist())
            assert got == set(torch.topk(pooled[0, g], n).indices.tolist())


def test_top_p_one_is_dense():
    q, k, v = _qkv()
    m = make_method("kascade_top_p:p=1.0,max=1.0", PLAN, SPEC, 0.1, 16)
    outs = _pass(m, q, k, v)
    dense = reference.dense_attention(q, k, v)
    for layer in range(8):
        torch.testing.assert_close(outs[layer], dense, rtol=1e-4, atol=1e-5)


def test_variants_prefill_dense_and_names():
    for name in ("kascade_sinks_window", "kascade_layer_budget", "kascade_top_p", "kascade_top_p:p=0.95"):
        assert is_method(name) and needs_plan(name)
        m = make_method(name, PLAN, SPEC)
        assert m.decode_only and m.describe()["name"] == name and m.name == name
    assert not is_method("kascade:p=0.9") and not is_method("kascade_top_p_x")
    with pytest.raises(KascadeInputError, match="unknown options"):
        make_method("kascade_top_p:q=0.9", PLAN, SPEC)
    with pytest.raises(KascadeInputError, match="key=value"):
        make_method("kascade_top_p:0.9", PLAN, SPEC)
    with pytest.raises(KascadeInputError, match="calibrated plan"):
        make_method("kascade_top_p", None, SPEC)
    q = torch.randn(1, 6, 40, 16)
    k = torch.randn(1, 2, 40, 16)
    v = torch.randn(1, 2, 40, 16)
    out = make_method("kascade_sinks_window", PLAN, SPEC, 0.1, 4)(1, q, k, v)
    torch.testing.assert_close(out, reference.dense_attention(q, k, v))


def test_reuse_out_of_order_raises():
    q, k, v = _qkv()
    m = make_method("kascade_sinks_window", PLAN, SPEC, 0.1, 16)
    with pytest.raises(KascadeInputError, match="in order"):
        m(1, q, k, v)


# ----------------------------------------------------------------------------------- plan + calibration
def test_plan_layer_budget_scale_validation_and_json(tmp_path):
    base = dict(model=SPEC, anchor_layers=PLAN.anchor_layers, head_map=PLAN.head_map)
    for bad, msg in (((1.0,) * 7, "one per layer"), ((1.0, 2.0) + (1.0,) * 6, "average 1.0"),
                     ((2.0,) + (1.0,) * 7, r"layer_budget_scale\[0\]"), ((1.0, 0.0, 2.0) + (1.0,) * 5, "positive"),
                     ((1.0, math.nan) + (1.0,) * 6, "positive")):
        with pytest.raises(PlanError, match=msg):
            Plan(**base, layer_budget_scale=bad)
    p = tmp_path / "p.json"
    PLAN.save(p)
    assert Plan.load(p).layer_budget_scale == SCALES
    plain = Plan(**base)
    assert "layer_budget_scale" not in plain.to_dict()  # absent stays absent (plan hashes unchanged)
    data = json.loads(p.read_text())
    data["layer_budget_scale"] = [1.0] * 7
    with pytest.raises(PlanError, match="one per layer"):
        Plan.from_dict(data)
    identity = Plan.identity(SPEC, (0, 3, 6))
    sharded = Plan(model=SPEC, anchor_layers=(0, 3, 6), head_map=identity.head_map, layer_budget_scale=SCALES)
    assert sharded.shard(1, 2).layer_budget_scale == SCALES
    assert PLAN.with_budget(0.2).layer_budget_scale == SCALES


def test_make_plan_layer_budgets():
    from kascade.calibrate import CalibrationStats, make_plan

    L, H = 6, 2
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(L, L, H, H, generator=g, dtype=torch.float64) * 0.5 + 0.5
    for j in range(L):
        sim[j, j] = torch.eye(H, dtype=torch.float64) * 0.5 + 0.5
    sim = torch.triu(sim.permute(2, 3, 0, 1)).permute(2, 3, 0, 1)
    stats = CalibrationStats(spec=ModelSpec("t", L, 4, H, 8), similarity=sim, importance=torch.ones(L, dtype=torch.float64),
                             num_prompts=1, num_tokens=100, stats_k=64, tile_size=32, variants={"budget_mean": sim})
    plan, _ = make_plan(stats, 3, layer_budgets=True)
    x = plan.layer_budget_scale
    assert len(x) == L and x[0] == 1.0 and abs(sum(x[1:]) / (L - 1) - 1) < 1e-5
    reuse = plan.provenance["layer_budget"]["reuse_similarity"]
    for j in range(L):
        a = max(t for t in plan.anchor_layers if t <= j)
        want = sum(float(sim[a, j, h, plan.head_map[j][h]]) for h in range(H)) / H
        assert abs(reuse[j] - want) < 1e-6
    assert make_plan(stats, 3)[0].layer_budget_scale == ()


def test_all_anchors_selects_per_layer():
    """Every layer attends the Top-k of its own pooled scores (here: different q per layer)."""
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1, 2, 300, 16, generator=g) * 2
    v = torch.randn(1, 2, 300, 16, generator=g)
    m = make_method("kascade_all_anchors", PLAN, SPEC, 0.1, 16, record_selection=True)
    kb = topk_budget(300, 0.1, 16)
    for layer in range(8):
        q = torch.randn(1, 6, 1, 16, generator=g) * 2
        out = m(layer, q, k, v)
        if layer == 0:
            torch.testing.assert_close(out, reference.dense_attention(q, k, v))
            continue
        pooled = decode_probs(q, k, torch.zeros(1, dtype=torch.long), torch.full((1,), 300), 0.25)
        pooled = pooled.reshape(1, 2, 3, 300).sum(2)
        for h in range(2):
            got = set(torch.nonzero(m.last_selection[layer][0, h * 3]).flatten().tolist())
            assert got == set(torch.topk(pooled[0, h], kb).indices.tolist())


def test_rerank_keeps_reuse_layers_best_candidates():
    """Anchors attend their Top-k; a reuse layer attends the k of its anchor head's Top-2k candidates that its
    own queries weigh most (softmax over the candidates, pooled over the group), checked by brute force."""
    g = torch.Generator().manual_seed(6)
    L = 300
    k = torch.randn(1, 2, L, 16, generator=g) * 2
    v = torch.randn(1, 2, L, 16, generator=g)
    m = make_method("kascade_rerank:candidates=2", PLAN, SPEC, 0.1, 16, record_selection=True)
    kb = topk_budget(L, 0.1, 16)
    anchor_pooled = {}
    for layer in range(8):
        q = torch.randn(1, 6, 1, 16, generator=g) * 2
        out = m(layer, q, k, v)
        pooled = decode_probs(q, k, torch.zeros(1, dtype=torch.long), torch.full((1,), L), 0.25)
        pooled = pooled.reshape(1, 2, 3, L).sum(2)[0]
        if PLAN.is_anchor(layer):
            anchor_pooled = pooled
        keep = m.last_selection[layer]
        if layer == 0:
            continue
        torch.testing.assert_close(out, masked_decode_attention(q, k, v, keep, 0.25), rtol=1e-4, atol=1e-5)
        for h in range(2):
            got = set(torch.nonzero(keep[0, h * 3]).flatten().tolist())
            assert len(got) == kb
            if PLAN.is_anchor(layer):
                assert got == set(torch.topk(pooled[h], kb).indices.tolist())
                continue
            cand = torch.topk(anchor_pooled[PLAN.head_map[layer][h]], 2 * kb).indices
            s = (q[0, h * 3:(h + 1) * 3, 0] @ k[0, h, cand].T) * 0.25
            score = torch.softmax(s, -1).sum(0)
            assert got == set(cand[torch.topk(score, kb).indices].tolist())


# ----------------------------------------------------------------------------------- two sets
def test_hedge_with_shared_takes_own_prefix_then_shared_order():
    pooled, s, e = _rows()
    kb = torch.tensor([30, 25, 20])
    own_sets = V.topk_ordered(pooled, s, e, kb)
    shared = V.topk_ordered(pooled.sum(1, keepdim=True), s, e, kb)
    own = torch.tensor([15, 0, 20])
    got = V.hedge_with_shared(own_sets, shared, kb, own)
    for b in range(3):
        for h in range(2):
            row = [int(i) for i in got[b, h] if i >= 0]
            assert len(row) == len(set(row)) == int(kb[b])  # exactly k distinct keys
            head = own_sets[b, h, : int(own[b])].tolist()
            assert row[: len(head)] == head
            rest = [int(i) for i in shared[b, 0] if int(i) not in head][: int(kb[b]) - len(head)]
            assert row[len(head):] == rest
            assert all(int(s[b]) <= i < int(e[b]) for i in row)


def test_two_sets_method_share_zero_is_kascade_and_one_is_all_heads_pooled():
    q, k, v = _qkv()
    L = k.shape[2]
    kb = topk_budget(L, 0.1, 16)
    pooled = decode_probs(q, k, torch.zeros(1, dtype=torch.long), torch.full((1,), L), 0.25).reshape(1, 2, 3, L).sum(2)
    shared = set(torch.topk(pooled[0].sum(0), kb).indices.tolist())
    for share in (0.0, 0.5, 1.0):
        m = make_method(f"kascade_two_sets:share={share}", PLAN, SPEC, 0.1, 16, record_selection=True)
        outs = _pass(m, q, k, v)
        for j in range(1, 8):
            for h in range(2):
                got = set(torch.nonzero(m.last_selection[j][0, h * 3]).flatten().tolist())
                assert len(got) == kb
                g = h if PLAN.is_anchor(j) else PLAN.head_map[j][h]
                mapped = torch.topk(pooled[0, g], kb).indices.tolist()
                if PLAN.is_anchor(j) or share == 0.0:
                    assert got == set(mapped)
                elif share == 1.0:
                    assert got == shared
                else:
                    assert set(mapped[: math.ceil(kb / 2)]) <= got and got <= set(mapped) | shared
            torch.testing.assert_close(outs[j], masked_decode_attention(q, k, v, m.last_selection[j], 0.25),
                                       rtol=1e-4, atol=1e-5)
    with pytest.raises(KascadeInputError, match="share"):
        make_method("kascade_two_sets:share=1.5", PLAN, SPEC)


def test_group_pool_method_ranks_by_the_power_of_the_group_probabilities():
    """power=1 is the paper's selection; power=a ranks keys by sum_g p_g^a, inf by the group's max; every layer
    attends exactly k keys (anchors their own set, reuse layers their mapped anchor head's)."""
    q, k, v = _qkv()
    q = q / 4  # flatter softmaxes than _qkv's, where the group's sum and max rank the same top keys
    L = k.shape[2]
    kb = topk_budget(L, 0.1, 16)
    probs = decode_probs(q, k, torch.zeros(1, dtype=torch.long), torch.full((1,), L), 0.25).reshape(1, 2, 3, L)
    pools = {"1": probs.sum(2), "3": probs.pow(3).sum(2), "inf": probs.amax(2)}
    chosen = {}
    for power, pooled in pools.items():
        m = make_method(f"kascade_group_pool:power={power}", PLAN, SPEC, 0.1, 16, record_selection=True)
        outs = _pass(m, q, k, v)
        for j in range(1, 8):
            for h in range(2):
                got = set(torch.nonzero(m.last_selection[j][0, h * 3]).flatten().tolist())
                g = h if PLAN.is_anchor(j) else PLAN.head_map[j][h]
                assert got == set(torch.topk(pooled[0, g], kb).indices.tolist())
            torch.testing.assert_close(outs[j], masked_decode_attention(q, k, v, m.last_selection[j], 0.25),
                                       rtol=1e-4, atol=1e-5)
        chosen[power] = torch.stack([m.last_selection[j] for j in range(1, 8)])
    assert not torch.equal(chosen["1"], chosen["inf"])  # the pooling changes which keys are shared
    paper = make_method("kascade_decode_only", PLAN, SPEC, 0.1, 16, record_selection=True)
    _pass(paper, q, k, v)
    assert torch.equal(torch.stack([paper.last_selection[j] for j in range(1, 8)]), chosen["1"])
    with pytest.raises(KascadeInputError, match="power"):
        make_method("kascade_group_pool:power=0", PLAN, SPEC)


def test_dense_tail_is_kascade_with_its_last_prefill_queries_dense():
    """The last `tokens` queries of a prefill pass get dense attention at every layer, the others Kascade's
    rolling prefill; decode steps and the anchors' selections are the paper's."""
    g = torch.Generator().manual_seed(3)
    B, Lk, tail = 2, 96, 20
    kv_start = torch.tensor([0, 13])  # row 1 left-padded
    tail_m = make_method(f"kascade_dense_tail:tokens={tail}", PLAN, SPEC, 0.1, 8, backend="reference")
    paper = make_method("kascade", PLAN, SPEC, 0.1, 8, backend="reference")
    assert not tail_m.decode_only and tail_m.describe()["dense_tail_tokens"] == tail
    for lq in (Lk, 1):  # prefill pass, then a decode step
        for layer in range(SPEC.num_layers):
            q = torch.randn(B, 6, lq, 16, generator=g)
            k, v = torch.randn(B, 2, Lk, 16, generator=g), torch.randn(B, 2, Lk, 16, generator=g)
            got = tail_m(layer, q, k, v, kv_start)
            want = paper(layer, q, k, v, kv_start)
            if lq == 1:
                torch.testing.assert_close(got, want)
                continue
            torch.testing.assert_close(got[:, :, :-tail], want[:, :, :-tail])
            dense = reference.dense_attention(q, k, v, kv_start)
            torch.testing.assert_close(got[:, :, -tail:], dense[:, :, -tail:])
            if layer:  # the sparse rows differ from dense: the check above can fail
                assert not torch.allclose(want[:, :, -tail:], dense[:, :, -tail:], atol=1e-3)
            torch.testing.assert_close(tail_m._indices, paper._indices)
    with pytest.raises(KascadeInputError, match="tokens must be >= 0"):
        make_method("kascade_dense_tail:tokens=-1", PLAN, SPEC)
