"""Every comparison method on a tiny random attention-only model: runs prefill + decode, attends no more
keys than its budget, and equals dense attention once the budget covers the whole context."""

from __future__ import annotations

import math

import pytest
import torch

from kascade import ModelSpec, Plan, reference
from kascade.baselines import METHODS, NEEDS_PLAN, make_method, scaled_layer
from kascade.baselines._common import masked_decode_attention
from kascade.validation import KascadeInputError
from kascade.variants import layer_budgets

SPEC = ModelSpec(architecture="tiny", num_layers=8, num_heads=6, num_kv_heads=2, head_dim=16, name="tiny")
PLAN = Plan(
    model=SPEC,
    anchor_layers=(0, 3, 6),
    head_map=tuple((0, 1) if j in (0, 3, 6) else ((1, 0) if j % 2 else (0, 0)) for j in range(8)),
    # per-layer budget scales (mean 1 over layers 1..7) for kascade_layer_budget; the others ignore them
    layer_budget_scale=(1.0, 1.5, 1.25, 0.5, 1.0, 0.75, 0.5, 1.5),
)


class TinyModel:
    """Attention-only residual stack with random projections and a per-layer KV cache."""

    def __init__(self, spec: ModelSpec, width: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.spec, self.width = spec, width
        Hq, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.wq = [torch.randn(width, Hq * D, generator=g) / math.sqrt(width) * 2 for _ in range(spec.num_layers)]
        self.wk = [torch.randn(width, Hkv * D, generator=g) / math.sqrt(width) * 2 for _ in range(spec.num_layers)]
        self.wv = [torch.randn(width, Hkv * D, generator=g) / math.sqrt(width) for _ in range(spec.num_layers)]
        self.wo = [torch.randn(Hq * D, width, generator=g) / math.sqrt(Hq * D) for _ in range(spec.num_layers)]

    def forward(self, method, x, cache, kv_start=None):
        """x [B, n, width] new tokens; cache: list of (k, v) per layer (grown in place)."""
        B, n, _ = x.shape
        s = self.spec
        for layer in range(s.num_layers):
            h = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # RMSNorm keeps the stack from blowing up
            q = (h @ self.wq[layer]).reshape(B, n, s.num_heads, s.head_dim).transpose(1, 2)
            k = (h @ self.wk[layer]).reshape(B, n, s.num_kv_heads, s.head_dim).transpose(1, 2)
            v = (h @ self.wv[layer]).reshape(B, n, s.num_kv_heads, s.head_dim).transpose(1, 2)
            if cache[layer] is not None:
                k = torch.cat([cache[layer][0], k], dim=2)
                v = torch.cat([cache[layer][1], v], dim=2)
            cache[layer] = (k, v)
            out = method(layer, q, k, v, kv_start, None)
            x = x + out.transpose(1, 2).reshape(B, n, -1) @ self.wo[layer]
        return x

    def run(self, method, L=300, steps=3, B=1, seed=1, kv_start=None):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(B, L, self.width, generator=g)
        cache = [None] * self.spec.num_layers
        outs = [self.forward(method, x, cache, kv_start)]
        for _ in range(steps):
            t = torch.randn(B, 1, self.width, generator=g)
            outs.append(self.forward(method, t, cache, kv_start))
        return outs


@pytest.fixture(scope="module")
def model():
    return TinyModel(SPEC)


def test_scaled_layers():
    assert [scaled_layer(l, 30) for l in (2, 8, 13, 18)] == [2, 8, 12, 17]
    assert [scaled_layer(l, 24) for l in (2, 8, 13, 18)] == [2, 6, 10, 14]
    assert [scaled_layer(l, 32) for l in (2, 8, 13, 18)] == [2, 8, 13, 18]


def test_make_method_names_and_errors():
    for name in METHODS:
        m = make_method(name, PLAN, SPEC, 0.1, 16)
        assert m.describe()["name"] == name
    with pytest.raises(KascadeInputError, match="unknown method"):
        make_method("nope", PLAN, SPEC)
    for name in NEEDS_PLAN:
        with pytest.raises(KascadeInputError, match="calibrated plan"):
            make_method(name, None, SPEC)
    assert make_method("kascade_decode_only", PLAN).decode_only
    assert not make_method("kascade", PLAN).decode_only
    assert not make_method("streamingllm", PLAN).decode_only
    assert all(make_method(n, PLAN).decode_only for n in ("quest", "omnikv", "lessismore", "tidaldecode"))


@pytest.mark.parametrize("name", METHODS)
def test_runs_prefill_and_decode(model, name):
    method = make_method(name, PLAN, SPEC, 0.1, 16)
    outs = model.run(method, L=200, steps=2)
    assert outs[0].shape == (1, 200, 32) and all(o.shape == (1, 1, 32) for o in outs[1:])
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("name", METHODS)
def test_decode_respects_budget(model, name):
    frac, floor = 0.1, 16
    method = make_method(name, PLAN, SPEC, frac, floor, record_selection=True)
    L, steps = 300, 2
    g = torch.Generator().manual_seed(3)
    cache = [None] * SPEC.num_layers
    model.forward(method, torch.randn(1, L, 32, generator=g), cache)
    sparse_layers = 0
    for step in range(steps):
        method.last_selection = {}
        model.forward(method, torch.randn(1, 1, 32, generator=g), cache)
        n_keys = L + step + 1
        k = reference.topk_budget(n_keys, frac, floor)
        assert set(method.last_selection) == set(range(SPEC.num_layers))
        for layer, keep in method.last_selection.items():
            if keep is None:
                continue
            sparse_layers += 1
            counts = keep.sum(-1)
            limit = max(k, 3 * 16) if name == "quest" else k
            low = min(k, 16)
            if name == "kascade_layer_budget":  # the layer's own budget (mean k over layers 1..7)
                limit = low = layer_budgets(k, n_keys, PLAN.layer_budget_scale)[layer]
            if name == "kascade_top_p":  # adaptive: between its floor and cap (2% and 30% of L, floor 16)
                low, limit = reference.topk_budget(n_keys, 0.02, floor), reference.topk_budget(n_keys, 0.3, floor)
            assert int(counts.max()) <= limit, (name, layer, counts.tolist(), limit)
            assert int(counts.min()) >= low, (name, layer, counts.tolist())
    if name != "dense":
        assert sparse_layers > 0


@pytest.mark.parametrize("name", [n for n in METHODS if n != "dense"])
def test_output_is_attention_over_recorded_keys(name):
    """The keys a method reports are the keys it attends: its decode output equals attention over them."""
    torch.manual_seed(0)
    method = make_method(name, PLAN, SPEC, 0.1, 16, record_selection=True)
    L = 257
    q = torch.randn(1, 6, 1, 16) * 2
    k = torch.randn(1, 2, L, 16) * 2
    v = torch.randn(1, 2, L, 16)
    for layer in range(SPEC.num_layers):
        out = method(layer, q, k, v)
        keep = method.last_selection[layer]
        want = reference.dense_attention(q, k, v) if keep is None else masked_decode_attention(q, k, v, keep, 0.25)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in METHODS if n != "kascade_top_p"])  # top-p: budget is p (own test)
def test_equals_dense_when_budget_covers_context(model, name):
    dense = model.run(make_method("dense", PLAN, SPEC), L=150, steps=3)
    full = model.run(make_method(name, PLAN, SPEC, 1.0, 16), L=150, steps=3)
    for a, b in zip(dense, full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the floor alone covering the context is the same thing
    floor = model.run(make_method(name, PLAN, SPEC, 0.01, 1000), L=150, steps=3)
    for a, b in zip(dense, floor):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["streamingllm", "quest", "omnikv", "lessismore", "tidaldecode", "kascade"])
def test_left_padding_matches_unpadded_row(model, name):
    """Row-relative conventions: a left-padded row gives the same outputs as the row alone."""
    method = make_method(name, PLAN, SPEC, 0.1, 16)
    pad = 7
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 180, 32, generator=g)
    t = torch.randn(1, 1, 32, generator=g)
    cache = [None] * SPEC.num_layers
    alone = [model.forward(method, x, cache), model.forward(method, t, cache)]
    method.reset()
    xp = torch.cat([torch.randn(1, pad, 32, generator=g), x], dim=1)
    cache = [None] * SPEC.num_layers
    kv_start = torch.tensor([pad])
    padded = [model.forward(method, xp, cache, kv_start), model.forward(method, t, cache, kv_start)]
    torch.testing.assert_close(padded[0][:, pad:], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[1], alone[1], rtol=1e-4, atol=1e-4)


def test_decode_only_methods_share_dense_prefill(model):
    dense = model.run(make_method("dense", PLAN, SPEC), L=200, steps=0)[0]
    for name in ("kascade_decode_only", "quest", "omnikv", "lessismore", "tidaldecode"):
        out = model.run(make_method(name, PLAN, SPEC, 0.1, 16), L=200, steps=0)[0]
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    sparse = model.run(make_method("streamingllm", PLAN, SPEC, 0.1, 16), L=200, steps=0)[0]
    assert not torch.allclose(sparse, dense, atol=1e-3)


def test_streamingllm_prefill_keeps_sinks_and_window():
    torch.manual_seed(0)
    method = make_method("streamingllm", PLAN, SPEC, 0.1, 16)
    L = 100
    q, k, v = torch.randn(1, 6, L, 16), torch.randn(1, 2, L, 16), torch.randn(1, 2, L, 16)
    out = method(1, q, k, v)
    for r in (5, 40, 99):
        n = reference.topk_budget(r + 1, 0.1, 16)
        keep = torch.zeros(1, 1, L, dtype=torch.bool)
        keep[..., :min(4, n)] = True
        keep[..., r + 1 - (n - min(4, n)): r + 1] = True
        want = masked_decode_attention(q[:, :, r:r + 1], k, v, keep, 0.25)
        torch.testing.assert_close(out[:, :, r:r + 1], want, rtol=1e-4, atol=1e-5)


def test_lessismore_set_shape():
    """Recent 25% (sinks included) + union-ranked 75%, one set for all heads."""
    method = make_method("lessismore", PLAN, SPEC, 0.1, 16)
    torch.manual_seed(0)
    L = 400
    p = torch.softmax(torch.randn(1, 6, L) * 3, -1)
    valid = torch.ones(1, L, dtype=torch.bool)
    k = reference.topk_budget(L, 0.1, 16)  # 40
    keep = method._select(p, valid, torch.tensor([k]))
    assert keep.shape == (1, 1, L) and int(keep.sum()) == k
    assert keep[0, 0, :4].all() and keep[0, 0, L - (k - 30 - 4):].all()
    # every head's best token is in the set
    assert keep[0, 0, p[0].argmax(-1)].all()


@pytest.mark.parametrize("window", [5, 40, None])
def test_masked_prefill_attention_matches_full_mask(window):
    """Chunks that compute scores only on the keys their queries may see give the full-mask result
    (sliding windows with sinks, and a scattered mask), padding rows included."""
    import math

    from kascade.baselines._common import masked_prefill_attention

    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, L, D = 2, 4, 2, 97, 16
    q, k, v = (torch.randn(B, h, L, D, generator=gen) for h in (Hq, Hkv, Hkv))
    ks, ke = torch.tensor([0, 9]), torch.tensor([L, L])
    scatter = torch.rand(L, L, generator=gen) < 0.3

    def allow(pos, n):
        keys = torch.arange(n)[None, :]
        if window is None:
            return scatter[pos][:, :n] | (keys == pos[:, None])
        return (keys < 2) | (keys > pos[:, None] - window)

    got = masked_prefill_attention(q, k, v, ks, ke, 0.25, allow)
    for b in range(B):
        n = int(ke[b] - ks[b])
        pos = torch.arange(n)
        mask = allow(pos, n) & (torch.arange(n)[None, :] <= pos[:, None])
        kb, vb = k[b, :, ks[b]:ke[b]].repeat_interleave(2, 0), v[b, :, ks[b]:ke[b]].repeat_interleave(2, 0)
        s = (q[b, :, L - n:] @ kb.transpose(-1, -2)) * 0.25
        want = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ vb
        assert torch.allclose(got[b, :, L - n:], want, atol=1e-5)
