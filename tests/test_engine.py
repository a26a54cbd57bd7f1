"""The engine driven by a 4-layer toy model: prefill then 16 decode steps, batch 2 of different lengths."""

from __future__ import annotations

import pytest
import torch

from kascade import VARIANTS, Engine, KascadeInputError, ModelSpec, Plan, PlanError

N_LAYERS, HQ, HKV, D, DM = 4, 8, 2, 16, 32
SPEC = ModelSpec("Toy", N_LAYERS, HQ, HKV, D, name="toy")


class ToyModel:
    """Residual stack of GQA attention layers with a left-padded KV cache: just enough of a decoder."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = [
            {n: torch.randn(DM, h * D, generator=g) / DM**0.5 for n, h in (("q", HQ), ("k", HKV), ("v", HKV))}
            | {"o": torch.randn(HQ * D, DM, generator=g) / (HQ * D) ** 0.5}
            for _ in range(N_LAYERS)
        ]

    def run(self, attention, x: torch.Tensor, kv_start: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Prefill x [B, L, DM], then `steps` decode steps feeding tanh of the last output back in."""
        cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * N_LAYERS
        outputs = []
        for step in range(steps + 1):
            B, L, _ = x.shape
            h = x
            for j, w in enumerate(self.w):
                q = (h @ w["q"]).view(B, L, HQ, D).transpose(1, 2)
                k = (h @ w["k"]).view(B, L, HKV, D).transpose(1, 2)
                v = (h @ w["v"]).view(B, L, HKV, D).transpose(1, 2)
                if cache[j] is not None:
                    k = torch.cat([cache[j][0], k], 2)
                    v = torch.cat([cache[j][1], v], 2)
                cache[j] = (k, v)
                a = attention(j, q, k, v, kv_start, None)
                h = h + a.transpose(1, 2).reshape(B, L, HQ * D) @ w["o"]
            outputs.append(h[:, -1:])
            x = torch.tanh(h[:, -1:])
        return outputs


def plan(fraction: float, floor: int = 4, tile: int = 8, head_map=None) -> Plan:
    head_map = head_map or ((0, 1), (1, 0), (0, 1), (0, 0))
    return Plan(SPEC, anchor_layers=(0, 2), head_map=head_map, topk_fraction=fraction, topk_floor=floor,
                tile_size=tile)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lengths = [45, 33]
    L = max(lengths)
    x = torch.randn(2, L, DM, generator=g)
    kv_start = torch.tensor([L - n for n in lengths])
    return x, kv_start


def test_fraction_one_equals_dense():
    model, (x, kv_start) = ToyModel(), batch()
    dense = model.run(Engine(plan(1.0), variant="dense"), x, kv_start, steps=16)
    sparse = model.run(Engine(plan(1.0)), x, kv_start, steps=16)
    for a, b in zip(dense, sparse):  # dense runs through SDPA, sparse through the reference: fp32 rounding
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def reference_kascade(p: Plan):
    """Kascade spelled out with kascade.reference, layer by layer: anchors select (layer 0 keeps a dense
    output), each reuse layer attends over its anchor's indices with the plan's head map applied."""
    from kascade import reference as R

    kept = {}

    def attend(layer, q, k, v, kv_start, kv_end):
        budget = dict(topk_fraction=p.topk_fraction, topk_floor=p.topk_floor)
        if layer in p.anchor_layers:
            if q.shape[2] == 1:
                kept["idx"] = R.select_decode(q, k, kv_start, kv_end, **budget)
            else:
                kept["idx"] = R.select_prefill(q, k, kv_start, kv_end, tile_size=p.tile_size, **budget)
            if layer == 0:
                return R.dense_attention(q, k, v, kv_start, kv_end)
            idx = kept["idx"]
        else:
            idx = kept["idx"][:, list(p.head_map[layer])]
        return R.sparse_attention(q, k, v, idx, kv_start, kv_end, tile_size=p.tile_size, **budget)

    return attend


def test_sparse_engine_matches_the_reference_layer_by_layer():
    model, (x, kv_start) = ToyModel(), batch()
    p = plan(0.1)
    engine = model.run(Engine(p), x, kv_start, steps=16)
    spelled_out = model.run(reference_kascade(p), x, kv_start, steps=16)
    for a, b in zip(engine, spelled_out):  # the engine's CPU path is SDPA over the same masks: fp32 rounding
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the comparison is not vacuous: Kascade at 10 % is far from dense on this toy
    dense = model.run(Engine(p, variant="dense"), x, kv_start, steps=16)
    assert max((a - b).abs().max().item() for a, b in zip(dense, engine)) > 1e-2


@pytest.mark.parametrize("variant", [v for v in VARIANTS])
@pytest.mark.parametrize("sparse_prefill", [True, False])
def test_padded_row_equals_row_alone(variant, sparse_prefill):
    model, (x, kv_start) = ToyModel(), batch()
    both = model.run(Engine(plan(0.1), variant=variant, sparse_prefill=sparse_prefill), x, kv_start, steps=16)
    pad = int(kv_start[1])
    alone = model.run(Engine(plan(0.1), variant=variant, sparse_prefill=sparse_prefill), x[1:, pad:],
                      torch.tensor([0]), steps=16)
    for a, b in zip(both, alone):
        torch.testing.assert_close(a[1:], b, atol=1e-4, rtol=1e-4)


def test_no_remap_equals_identity_head_map():
    model, (x, kv_start) = ToyModel(), batch()
    no_remap = model.run(Engine(plan(0.1), variant="no_remap"), x, kv_start, steps=4)
    identity = model.run(Engine(Plan.identity(SPEC, (0, 2), topk_fraction=0.1, topk_floor=4, tile_size=8)),
                         x, kv_start, steps=4)
    for a, b in zip(no_remap, identity):
        torch.testing.assert_close(a, b)


def test_head_map_changes_reuse_layers():
    model, (x, kv_start) = ToyModel(), batch()
    mapped = model.run(Engine(plan(0.1)), x, kv_start, steps=2)
    identity = model.run(Engine(plan(0.1), variant="no_remap"), x, kv_start, steps=2)
    assert max((a - b).abs().max().item() for a, b in zip(mapped, identity)) > 1e-5


def test_track_stats_reports_mass_and_fraction():
    model, (x, kv_start) = ToyModel(), batch()
    engine = Engine(plan(0.1), track_stats=True)
    model.run(engine, x, kv_start, steps=2)
    assert set(engine.stats) == {1, 2, 3}  # layer 0 is dense
    for st in engine.stats.values():
        assert all(0 < m <= 1 for m in st.captured_mass)
        assert all(0 < f < 1 for f in st.attended_fraction)


def test_engine_errors():
    model, (x, kv_start) = ToyModel(), batch()
    engine = Engine(plan(0.1))
    q = torch.randn(1, HQ, 4, D)
    k = torch.randn(1, HKV, 4, D)
    with pytest.raises(KascadeInputError, match="layer 1 reuses anchor layer 0"):
        engine(1, q, k, k)
    with pytest.raises(PlanError, match="got 4 query heads, 2 KV heads, head dim 16; the plan expects 8, 2, 16"):
        engine(0, q[:, :4], k, k)
    with pytest.raises(PlanError, match="layer 4 out of range"):
        engine(4, q, k, k)
    with pytest.raises(KascadeInputError, match="variant='fast'"):
        Engine(plan(0.1), variant="fast")
