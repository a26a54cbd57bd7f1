"""Every shipped plan: loads, validates, fits its model; the authors' plans match their source data and
configs; `kascade plans` lists them all."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from kascade import ModelSpec, PlanError
from kascade.cli import main as cli_main
from kascade.plans import load_shipped, path_of, shipped, source_of

ROOT = Path(__file__).resolve().parents[1]
AUTHORS = "authors (microsoft/kascade)"
AUTHORS_COMMIT = "76aea84d4216b538e001fab018cbc24894ce32c3"

# (architecture, layers, query heads, KV heads, head dim) from each model's Hugging Face config.json.
AUTHORS_MODELS = {
    "llama-3.1-8b-instruct": ("llama", 32, 32, 8, 128),
    "deepseek-r1-distill-llama-8b": ("llama", 32, 32, 8, 128),
    "qwen3-8b": ("qwen3", 36, 32, 8, 128),
}
AUTHORS_ANCHORS = {
    "llama-3.1-8b-instruct": (0, 2, 8, 13, 14),
    "deepseek-r1-distill-llama-8b": (0, 2, 8, 13, 14),
    "qwen3-8b": (0, 2, 7, 14, 23),
}


def _converter():
    spec = importlib.util.spec_from_file_location("convert_authors_plans", ROOT / "scripts" / "convert_authors_plans.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# Our Qwen plans, calibrated with one recipe (4K dev prompts, scored at the plan's budget, uniform layer
# weights): (architecture, layers, query heads, KV heads, head dim) from the loaded model's config.
CALIBRATED_QWEN = {
    "qwen2.5-0.5b": ("qwen2", 24, 14, 2, 64),
    "qwen2.5-1.5b": ("qwen2", 28, 12, 2, 128),
}


def test_shipped_names():
    assert set(AUTHORS_MODELS) | set(CALIBRATED_QWEN) | {"smollm2-135m", "smollm2-135m-11a"} <= set(shipped())


@pytest.mark.parametrize("name", sorted(CALIBRATED_QWEN))
def test_calibrated_qwen_plans_fit_their_models_and_recipe(name):
    from kascade import models

    plan = load_shipped(name)
    m = plan.model
    assert (m.architecture, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == CALIBRATED_QWEN[name]
    assert m.name == name and name in models.MODELS
    assert (plan.topk_fraction, plan.topk_floor, plan.tile_size) == (0.10, 128, 32)
    assert len(plan.anchor_layers) == 5
    prov = plan.provenance
    assert source_of(plan) == "kascade calibrate"
    assert prov["model_name"] == models.MODELS[name].display_name
    cmd = prov["command"]
    assert cmd.startswith(f"kascade calibrate --model {name} ")
    for opt in ("--max-tokens 4096", "--anchors 5", "--topk-fraction 0.1", "--topk-floor 128", "--stats-budget",
                "--weighting uniform"):
        assert opt in cmd
    assert prov["variant"] == "budget_min" and prov["samples"] >= 8 and prov["tokens"] > 7 * 3800
    chosen = next(r for r in prov["dp_table"] if r["num_anchors"] == 5)
    assert chosen["anchor_layers"] == list(plan.anchor_layers)


@pytest.mark.parametrize("name", shipped())
def test_every_shipped_plan_loads_and_validates(name):
    plan = load_shipped(name)
    plan.validate()
    plan.check_model(plan.model)
    assert plan.model.name == name or name.startswith(plan.model.name + "-")  # e.g. smollm2-135m-11a
    assert plan.anchor_layers[0] == 0
    identity = tuple(range(plan.model.num_kv_heads))
    for a in plan.anchor_layers:
        assert plan.head_map[a] == identity
    assert plan.provenance["command"]
    assert source_of(plan) in ("kascade calibrate", AUTHORS)
    # the file is exactly what Plan writes (no hand edits, round-trips)
    assert json.loads(path_of(name).read_text()) == plan.to_dict()


@pytest.mark.parametrize("name", sorted(AUTHORS_MODELS))
def test_authors_plans_fit_their_models(name):
    plan = load_shipped(name)
    m = plan.model
    assert (m.architecture, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == AUTHORS_MODELS[name]
    assert plan.anchor_layers == AUTHORS_ANCHORS[name]
    assert (plan.topk_fraction, plan.topk_floor, plan.tile_size) == (0.10, 128, 32)
    assert any(len(set(row)) < m.num_kv_heads for row in plan.head_map)  # a real remap, not the identity
    prov = plan.provenance
    assert source_of(plan) == AUTHORS
    assert prov["source_repo"] == "https://github.com/microsoft/kascade"
    assert prov["source_commit"] == AUTHORS_COMMIT
    assert prov["license"] == "MIT" and "Microsoft" in prov["license_notice"]
    assert prov["source_path"].startswith("results/head_mappings/")
    assert prov["command"].startswith("python scripts/convert_authors_plans.py")


@pytest.mark.parametrize("name", sorted(AUTHORS_MODELS))
def test_authors_plans_are_their_arrays_unchanged(name):
    plan = load_shipped(name)
    data = ROOT / "scripts" / "data" / "microsoft-kascade"
    raw = np.load(data / plan.provenance["source_path"])
    assert raw.shape == (plan.model.num_layers, plan.model.num_kv_heads)
    assert raw.tolist() == [list(r) for r in plan.head_map]
    assert "_layers_" + "_".join(map(str, plan.anchor_layers)) + ".npy" in plan.provenance["source_path"]


def test_converter_reproduces_the_shipped_plans(tmp_path):
    conv = _converter()
    data = ROOT / "scripts" / "data" / "microsoft-kascade"
    assert conv.main([str(data), "--commit", AUTHORS_COMMIT, "--out-dir", str(tmp_path)]) == 0
    for name in AUTHORS_MODELS:
        got = json.loads((tmp_path / f"{name}.json").read_text())
        want = json.loads(path_of(name).read_text())
        got["provenance"].pop("command"), want["provenance"].pop("command")
        assert got == want


def test_converter_refuses_a_map_of_the_wrong_shape(tmp_path):
    conv = _converter()
    maps = tmp_path / "results" / "head_mappings"
    maps.mkdir(parents=True)
    np.save(maps / "Qwen3-8B_layers_0_2_7_14_23.npy", np.zeros((32, 8), dtype=np.int32))  # 36 layers expected
    model = next(m for m in conv.MODELS if m.name == "qwen3-8b")
    with pytest.raises(PlanError, match="does not fit"):
        conv.convert(tmp_path, model, AUTHORS_COMMIT, "test", {})


def test_plan_checked_against_the_wrong_model_raises():
    llama = load_shipped("llama-3.1-8b-instruct")
    qwen3 = load_shipped("qwen3-8b")
    with pytest.raises(PlanError, match="36 layers"):
        llama.check_model(qwen3.model)
    with pytest.raises(PlanError, match="KV heads"):
        llama.check_model(ModelSpec("llama", 32, 32, 4, 128, name="other"))
    llama.check_model(load_shipped("deepseek-r1-distill-llama-8b").model)  # same shape: accepted


def test_cli_plans_lists_every_shipped_plan(capsys):
    assert cli_main(["plans"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in shipped():
        row = next(line for line in lines if line.startswith(name + " "))
        plan = load_shipped(name)
        assert " ".join(map(str, plan.anchor_layers)) in row
        assert source_of(plan) in row
    assert "36L 32q/8kv d128" in next(line for line in lines if line.startswith("qwen3-8b "))


def test_cli_plans_show(capsys):
    assert cli_main(["plans", "show", "qwen3-8b"]) == 0
    assert json.loads(capsys.readouterr().out) == load_shipped("qwen3-8b").to_dict()
    assert cli_main(["plans", "show", "no-such-plan"]) == 1
    assert "no shipped plan" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(AUTHORS_MODELS) + sorted(CALIBRATED_QWEN))
def test_plans_drive_the_engine_at_their_shapes(name):
    """Every layer of the model's shape through Engine (reference backend): prefill then one decode step;
    at a full budget Kascade equals dense attention, so the plan's anchors and head map are wired in."""
    import torch

    from kascade import Engine

    plan = load_shipped(name)
    m = plan.model
    gen = torch.Generator().manual_seed(0)
    L = 160
    q = torch.randn(1, m.num_heads, L, m.head_dim, generator=gen)
    k = torch.randn(1, m.num_kv_heads, L, m.head_dim, generator=gen)
    v = torch.randn(1, m.num_kv_heads, L, m.head_dim, generator=gen)
    full = Engine(plan.with_budget(topk_fraction=1.0), backend="reference")
    dense = Engine(plan, variant="dense", backend="reference")
    sparse = Engine(plan.with_budget(topk_floor=16), backend="reference")
    for layer in range(m.num_layers):
        ref = dense(layer, q, k, v)
        torch.testing.assert_close(full(layer, q, k, v), ref, atol=1e-5, rtol=1e-5)
        out = sparse(layer, q, k, v)
        assert out.shape == q.shape and torch.isfinite(out).all()
    for layer in range(m.num_layers):  # decode
        out = sparse(layer, q[:, :, -1:], k, v)
        assert out.shape == (1, m.num_heads, 1, m.head_dim) and torch.isfinite(out).all()
