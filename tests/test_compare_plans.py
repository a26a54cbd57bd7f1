"""scripts/compare_plans.py on a tiny random model: structure, and exactness when the budget is every key."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kascade import Plan

transformers = pytest.importorskip("transformers")


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "compare_plans.py"
    spec = importlib.util.spec_from_file_location("compare_plans", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    from kascade.integrations.hf import model_spec

    return model, model_spec(model)


def test_compare_plans_structure(tiny):
    mod = _script()
    model, spec = tiny
    plans = {"a": Plan.identity(spec, (0, 2), topk_floor=8, tile_size=8),
             "b": Plan.identity(spec, (0, 1, 2, 3), topk_floor=8, tile_size=8)}
    g = torch.Generator().manual_seed(1)
    inputs = [("p0", torch.randint(0, 64, (1, 150), generator=g)), ("p1", torch.randint(0, 64, (1, 90), generator=g))]
    res = mod.compare(model, plans, inputs, steps=5, topk_fraction=0.1, topk_floor=8, progress=False)
    assert model.config._attn_implementation == "sdpa"  # the model is restored
    assert set(res["plans"]) == {"a", "b"} and len(res["prompts"]) == 2
    for name, p in res["plans"].items():
        assert len(p["captured_mass"]) == 4 and p["captured_mass"][0] == 1.0
        # layer 0 is dense (mass 1); elsewhere no selection of the budget beats each head's own Top-k
        assert all(0 < m <= o + 1e-4 for m, o in zip(p["captured_mass"][1:], p["oracle_mass"][1:]))
        # the summary is the mean over prompts (same number of steps each) of the per-prompt numbers
        assert p["kl_mean"] == pytest.approx(sum(r["plans"][name]["kl"] for r in res["prompts"]) / 2, rel=1e-9)
        assert p["top1"] == pytest.approx(sum(r["plans"][name]["top1"] for r in res["prompts"]) / 2, rel=1e-9)
    # Same tokens for every plan: the oracle agrees where the layer's input is still dense (layers 0, 1;
    # later layers see the plan's own sparse outputs of earlier layers).
    assert res["plans"]["a"]["oracle_mass"][:2] == pytest.approx(res["plans"]["b"]["oracle_mass"][:2], abs=1e-5)
    # Every layer an anchor selects the group's own Top-k: at least as good as reusing at layers 1 and 3.
    assert res["plans"]["b"]["mass_mean"] >= res["plans"]["a"]["mass_mean"] - 1e-6
    text = mod.format_table(res)
    assert "oracle" in text and "p1" in text


def test_compare_plans_full_budget_is_dense(tiny):
    mod = _script()
    model, spec = tiny
    plans = {"a": Plan.identity(spec, (0, 2), topk_floor=8, tile_size=8)}
    inputs = [("p", torch.randint(0, 64, (1, 60), generator=torch.Generator().manual_seed(2)))]
    res = mod.compare(model, plans, inputs, steps=4, topk_fraction=1.0, topk_floor=8, progress=False)
    p = res["plans"]["a"]
    assert p["captured_mass"] == pytest.approx([1.0] * 4, abs=1e-4)
    assert p["kl_mean"] == pytest.approx(0.0, abs=1e-6) and p["top1"] == 1.0
