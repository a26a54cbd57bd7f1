"""The vLLM plugin's pieces that do not need vLLM (CI has no vLLM): the entry point, the layer index
from vLLM's layer names, the plan from KASCADE_PLAN and its check against the served model's shape.
The backend classes themselves run on the GPU machine (`kascade bench serve`, tests/gpu)."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from kascade import PlanError
from kascade.integrations import vllm as kv
from kascade.plans import load_shipped, path_of


def test_entry_point_registers_the_plugin():
    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "kascade"]
    assert len(eps) == 1 and eps[0].value == "kascade.integrations.vllm:register"


@pytest.mark.parametrize("name,want", [("model.layers.0.self_attn.attn", 0), ("model.layers.31.self_attn.attn", 31),
                                       ("language_model.model.layers.7.self_attn.attn", 7)])
def test_layer_index(name, want):
    assert kv.layer_index(name) == want


def test_layer_index_refuses_other_names():
    with pytest.raises(PlanError, match="cannot find the layer index"):
        kv.layer_index("model.decoder.attn")


def test_load_plan_by_name_path_and_budget(monkeypatch):
    monkeypatch.setenv(kv.PLAN_ENV, "llama-3.1-8b-instruct")
    monkeypatch.delenv(kv.FRACTION_ENV, raising=False)
    assert kv.load_plan() == load_shipped("llama-3.1-8b-instruct")
    monkeypatch.setenv(kv.PLAN_ENV, str(path_of("qwen3-8b")))
    monkeypatch.setenv(kv.FRACTION_ENV, "1.0")
    plan = kv.load_plan()
    assert plan.model.num_layers == 36 and plan.topk_fraction == 1.0
    monkeypatch.delenv(kv.PLAN_ENV)
    with pytest.raises(PlanError, match="set KASCADE_PLAN"):
        kv.load_plan()


def test_check_plan_against_the_served_model():
    plan = load_shipped("llama-3.1-8b-instruct")
    kv.check_plan(plan, num_layers=32, num_heads=32, num_kv_heads=8, head_size=128)
    with pytest.raises(PlanError, match="vLLM runs 28 layers"):
        kv.check_plan(plan, num_layers=28, num_heads=28, num_kv_heads=4, head_size=128)
    with pytest.raises(PlanError, match="4 KV heads"):  # tensor parallelism 2 shards the KV heads
        kv.check_plan(plan, num_layers=32, num_heads=16, num_kv_heads=4, head_size=128)
