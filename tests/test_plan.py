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


# ---------------------------------------------------------------- tensor parallelism (issue 17)
SPEC4 = ModelSpec(architecture="LlamaForCausalLM", num_layers=4, num_heads=8, num_kv_heads=4, head_dim=16, name="tp")
# anchors 0 and 2; under TP=2 shards are KV heads {0, 1} and {2, 3}; under TP=4 every head is its own shard
SHARD2_MAP = ((0, 1, 2, 3), (1, 1, 3, 2), (0, 1, 2, 3), (0, 0, 2, 2))  # crosses no TP=2 shard; crosses TP=4
CROSS_MAP = ((0, 1, 2, 3), (1, 1, 3, 2), (0, 1, 2, 3), (0, 2, 2, 3))  # layer 3: KV head 1 -> anchor head 2


def test_valid_for_tp_from_the_head_map():
    p = Plan(SPEC4, (0, 2), SHARD2_MAP)
    assert [p.valid_for_tp(t) for t in (1, 2, 3, 4, 8)] == [True, True, False, False, False]
    assert p.tp_crossings(4) == [(1, 0, 1), (1, 2, 3), (1, 3, 2), (3, 1, 0), (3, 3, 2)]
    cross = Plan(SPEC4, (0, 2), CROSS_MAP)
    assert cross.valid_for_tp(1) and not cross.valid_for_tp(2)
    assert cross.tp_crossings(2) == [(3, 1, 2)]
    ident = Plan.identity(SPEC4, (0, 2))
    assert all(ident.valid_for_tp(t) for t in (1, 2, 4))


def test_shard_reindexes_heads_to_the_rank():
    p = Plan(SPEC4, (0, 2), SHARD2_MAP, topk_fraction=0.3, topk_floor=4, tile_size=8)
    r0, r1 = p.shard(0, 2), p.shard(1, 2)
    for r in (r0, r1):
        assert (r.model.num_heads, r.model.num_kv_heads, r.model.head_dim, r.model.num_layers) == (4, 2, 16, 4)
        assert (r.anchor_layers, r.topk_fraction, r.topk_floor, r.tile_size) == ((0, 2), 0.3, 4, 8)
    assert r0.head_map == ((0, 1), (1, 1), (0, 1), (0, 0))
    assert r1.head_map == ((0, 1), (1, 0), (0, 1), (0, 0))  # global heads 2, 3 -> local 0, 1
    assert r1.provenance["tp_shard"] == {"rank": 1, "tp_size": 2}
    assert p.shard(0, 1) == p
    # every rank's map, shifted back to global heads, is the full map's slice
    for rank, r in enumerate((r0, r1)):
        for j in range(4):
            assert tuple(g + 2 * rank for g in r.head_map[j]) == SHARD2_MAP[j][2 * rank: 2 * rank + 2]


def test_shard_errors_name_the_crossing():
    cross = Plan(SPEC4, (0, 2), CROSS_MAP)
    with pytest.raises(PlanError, match=r"crosses tensor-parallel shards at TP size 2: layer 3 KV head 1 \(shard 0\) "
                                        r"reuses KV head 2 \(shard 1\) of anchor layer 2"):
        cross.shard(0, 2)
    with pytest.raises(PlanError, match="TP size 3 does not divide the model's 4 KV heads"):
        cross.shard(0, 3)
    with pytest.raises(PlanError, match=r"TP rank 2 out of range 0..1"):
        Plan(SPEC4, (0, 2), SHARD2_MAP).shard(2, 2)
    with pytest.raises(PlanError, match="and 4 more"):
        Plan(SPEC4, (0, 2), SHARD2_MAP).shard(0, 4)


def test_tp_sizes_validated_and_round_trip(tmp_path):
    p = Plan(SPEC4, (0, 2), SHARD2_MAP, tp_sizes=(1, 2))
    path = tmp_path / "tp.json"
    p.save(path)
    data = json.loads(path.read_text())
    assert data["tp_sizes"] == [1, 2]
    q = Plan.load(path)
    assert q == p and q.tp_sizes == (1, 2)
    assert q != Plan(SPEC4, (0, 2), SHARD2_MAP)  # tp_sizes is part of the plan
    with pytest.raises(PlanError, match=r"tp_sizes lists 4, but TP size 4 is crossed by the head map \(5 reuse heads"):
        Plan(SPEC4, (0, 2), SHARD2_MAP, tp_sizes=(2, 4))
    with pytest.raises(PlanError, match="tp_sizes lists 3, but TP size 3 does not divide the 4 KV heads"):
        Plan(SPEC4, (0, 2), SHARD2_MAP, tp_sizes=(3,))
    with pytest.raises(PlanError, match="tp_sizes must be positive integers"):
        Plan(SPEC4, (0, 2), SHARD2_MAP, tp_sizes=(0,))


def test_old_json_without_tp_sizes_loads(tmp_path):
    data = plan().to_dict()
    assert "tp_sizes" not in data  # not written when not recorded: old files and their hashes unchanged
    old = {k: v for k, v in data.items()}
    (tmp_path / "old.json").write_text(json.dumps(old))
    p = Plan.load(tmp_path / "old.json")
    assert p.tp_sizes == () and p == plan()
    assert p.valid_for_tp(1) and not p.valid_for_tp(2)  # SPEC's map sends layer 1 head 0 to head 1
