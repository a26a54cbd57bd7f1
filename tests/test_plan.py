"""Plan JSON round trip and one test per validation error."""

from __future__ import annotations

import json

import pytest

from kascade import ModelSpec, Plan, PlanError

SPEC = ModelSpec(architecture="LlamaForCausalLM", num_layers=6, num_heads=8, num_kv_heads=2, head_dim=64, name="toy")


def plan(**kw):
    base = dict(
        model=SPEC,
        anchor_layers=(0, 2, 4),
        head_map=((0, 1), (1, 1), (0, 1), (0, 0), (0, 1), (1, 0)),
        topk_fraction=0.1,
        topk_floor=128,
        tile_size=32,
        provenance={"command": "kascade calibrate ..."},
    )
    base.update(kw)
    return Plan(**base)


def test_round_trip(tmp_path):
    p = plan()
    path = tmp_path / "plan.json"
    p.save(path)
    q = Plan.load(path)
    assert q == p and q.provenance == p.provenance
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["model"]["num_kv_heads"] == 2


def test_anchor_of():
    p = plan()
    assert [p.anchor_of(j) for j in range(6)] == [0, 0, 2, 2, 4, 4]
    with pytest.raises(PlanError, match="layer 6 out of range: the model has 6 layers"):
        p.anchor_of(6)


def test_identity_plan():
    p = Plan.identity(SPEC, (0, 3))
    assert p.head_map[5] == (0, 1)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(anchor_layers=(1, 2)), r"layer 0 must be an anchor, got anchor_layers=\[1, 2\]"),
        (dict(anchor_layers=(0, 4, 2)), r"anchor_layers must be sorted and unique, got \[0, 4, 2\]"),
        (dict(anchor_layers=(0, 2, 2)), r"anchor_layers must be sorted and unique"),
        (dict(anchor_layers=(0, 6)), r"anchor layer 6 out of range: the model has 6 layers"),
        (dict(head_map=((0, 1),) * 5), r"head_map has 5 rows, expected one per layer \(6\)"),
        (dict(head_map=((0, 1),) * 5 + ((0, 1, 1),)), r"head_map\[5\] has 3 entries, expected num_kv_heads=2"),
        (dict(head_map=((0, 1),) * 5 + ((0, 2),)), r"head_map\[5\] has KV head 2 out of range 0..1"),
        (dict(head_map=((0, 1), (1, 1), (1, 1), (0, 0), (0, 1), (1, 0))),
         r"head_map\[2\] must be the identity because layer 2 is an anchor"),
        (dict(topk_fraction=0.0), r"topk_fraction must be in \(0, 1\], got 0.0"),
        (dict(topk_floor=0), "topk_floor must be a positive integer, got 0"),
        (dict(tile_size=0), "tile_size must be a positive integer, got 0"),
    ],
)
def test_validation_errors(kw, message):
    with pytest.raises(PlanError, match=message):
        plan(**kw)


def test_model_spec_errors():
    with pytest.raises(PlanError, match=r"num_heads \(9\) must be a multiple of model.num_kv_heads \(2\)"):
        ModelSpec("x", 2, 9, 2, 64)
    with pytest.raises(PlanError, match="model.head_dim must be a positive integer, got 0"):
        ModelSpec("x", 2, 8, 2, 0)


def test_check_model_names_the_mismatch():
    other = ModelSpec(architecture="Qwen2ForCausalLM", num_layers=24, num_heads=8, num_kv_heads=2, head_dim=64)
    with pytest.raises(PlanError, match=r"plan was made for a model with 6 layers \(toy\), this model has 24 layers"):
        plan().check_model(other)
    plan().check_model(SPEC)


def test_load_errors(tmp_path):
    bad = plan().to_dict()
    bad["schema_version"] = 99
    (tmp_path / "a.json").write_text(json.dumps(bad))
    with pytest.raises(PlanError, match="schema_version is 99, this kascade reads version 1"):
        Plan.load(tmp_path / "a.json")
    bad = plan().to_dict()
    bad["anchors"] = [0]
    (tmp_path / "b.json").write_text(json.dumps(bad))
    with pytest.raises(PlanError, match=r"unknown fields \['anchors'\]"):
        Plan.load(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("{")
    with pytest.raises(PlanError, match="is not valid JSON"):
        Plan.load(tmp_path / "c.json")
    bad = plan().to_dict()
    del bad["head_map"]
    (tmp_path / "d.json").write_text(json.dumps(bad))
    with pytest.raises(PlanError, match=r"missing required fields \['head_map'\]"):
        Plan.load(tmp_path / "d.json")


def test_with_budget():
    p = plan().with_budget(topk_fraction=0.2)
    assert p.topk_fraction == 0.2 and p.anchor_layers == (0, 2, 4)
