"""The Pareto chart of `kascade eval`: the front, the attended-key definitions, the decode speed model and the
report-only path writing the plot and the JSON fields (CPU, no model)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kascade import plans
from kascade.budget import topk_budget
from kascade.eval import report, speed_model

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "results" / "decode_b64.json"


# ------------------------------------------------------------------------------------------ the front
def _brute_front(points, larger_x_better):
    def better_eq(a, b):  # a at least as good as b on x
        return a >= b if larger_x_better else a <= b

    front = set()
    for i, (xi, yi) in enumerate(points):
        dominated = any(better_eq(xj, xi) and yj >= yi and (xj != xi or yj != yi)
                        for j, (xj, yj) in enumerate(points) if j != i)
        if not dominated:
            front.add(i)
    return front


@pytest.mark.parametrize("larger_x_better", [False, True])
def test_pareto_front_matches_brute_force(larger_x_better):
    rng = random.Random(1)
    for trial in range(300):
        n = rng.randint(1, 9)
        # small integer grids force ties in x, in y and repeated points
        points = [(rng.randint(0, 4) / 4, float(rng.randint(0, 5))) for _ in range(n)]
        got = report.pareto_front(points, larger_x_better=larger_x_better)
        assert set(got) == _brute_front(points, larger_x_better), (trial, points)
        assert len(got) == len(set(got))
        assert [points[i][0] for i in got] == sorted(points[i][0] for i in got)


def test_pareto_front_example():
    # (fraction of keys, score): fewer keys better
    pts = [(1.0, 61.0), (0.14, 57.9), (0.29, 55.9), (0.10, 10.1), (0.14, 50.0), (0.25, 57.9)]
    assert report.pareto_front(pts) == [3, 1, 0]
    # (speedup, score): more speed better
    pts = [(1.0, 61.0), (3.3, 57.9), (2.9, 55.9), (7.6, 10.1), (3.4, 55.3)]
    assert report.pareto_front(pts, larger_x_better=True) == [0, 1, 4, 3]


# ------------------------------------------------------------------------------------------ definitions
@pytest.fixture(scope="module")
def qwen():
    plan = plans.load_shipped("qwen2.5-0.5b")
    return plan, plan.model


def test_decode_attended_fraction_definitions(qwen):
    plan, spec = qwen
    L = spec.num_layers
    n = 4097
    k = topk_budget(n, 0.1, 128)
    kas = speed_model.method_layers("kascade", plan, spec, 0.1, 128)
    assert speed_model.decode_attended(kas, [n], 0.1, 128) == [1.0] + [k / n] * (L - 1)
    omni = speed_model.method_layers("omnikv", plan, spec, 0.1, 128)
    att = speed_model.decode_attended(omni, [n], 0.1, 128)
    dense_layers = [j for j, a in enumerate(att) if a == 1.0]
    assert dense_layers == [0, 1, 2, 6, 14]  # before the first filter layer, and the filter layers
    quest = speed_model.method_layers("quest", plan, spec, 0.1, 128)
    att = speed_model.decode_attended(quest, [n], 0.1, 128)
    assert att[:2] == [1.0, 1.0] and att[2] == pytest.approx((k // 16) * 16 / n)
    # below the floor every layer attends everything
    assert speed_model.decode_attended(kas, [100], 0.1, 128) == [1.0] * L
    # adaptive budgets have no definition: only a measurement gives them
    assert speed_model.decode_attended(speed_model.method_layers("kascade_top_p", plan, spec, 0.1, 128),
                                       [n], 0.1, 128) is None
    # the decode steps of a cell: n_tokens + 1 .. n_tokens + new_tokens - 1
    assert speed_model.decode_key_counts({"n_tokens": 10, "new_tokens": 4}) == [11, 12, 13]
    assert speed_model.decode_key_counts({"n_tokens": 10, "new_tokens": 1}) == [11]


def _rolling_brute(n, frac, floor, tile):
    att = vis = 0
    for r in range(n):
        t0 = (r // tile) * tile
        b = topk_budget(t0, frac, floor)
        prefix = t0 if t0 <= b else b  # a tile whose prefix fits its budget attends densely
        att += prefix + (r - t0 + 1)
        vis += r + 1
    return att / vis


def test_prefill_attended_fraction_matches_brute_force(qwen):
    plan, spec = qwen
    L = spec.num_layers
    kas = speed_model.method_layers("kascade", plan, spec, 0.1, 16)
    for n in (5, 33, 300, 1000):
        want = (1.0 + (L - 1) * _rolling_brute(n, 0.1, 16, plan.tile_size)) / L
        assert speed_model.prefill_attended(kas, [n], 0.1, 16) == pytest.approx(want, rel=1e-12)
    stream = speed_model.method_layers("streamingllm", plan, spec, 0.1, 16)
    n = 500
    want = sum(topk_budget(r + 1, 0.1, 16) for r in range(n)) / sum(r + 1 for r in range(n))
    assert speed_model.prefill_attended(stream, [n], 0.1, 16) == pytest.approx(want, rel=1e-12)
    assert speed_model.prefill_attended(speed_model.method_layers("kascade_decode_only", plan, spec, 0.1, 16),
                                        [n], 0.1, 16) == 1.0


# ------------------------------------------------------------------------------------------ speed model
def test_speed_model_reproduces_the_bench_on_its_own_shape():
    """The Llama-3.1-8B plan (32 layers, 5 anchors) is the model `kascade bench decode` itself models: the
    same ratios must give the bench's own model_speedup at every measured budget."""
    plan = plans.load_shipped("llama-3.1-8b-instruct")
    costs = speed_model.load_decode_costs(BENCH, plan.model)
    assert (costs.heads, costs.kv_heads, costs.head_dim) == (32, 8, 128) and costs.geometry == "the model's own geometry"
    rows = [r for r in json.loads(BENCH.read_text())["rows"] if r["context"] == 131072 and r["heads"] == 32]
    assert len(rows) == 3
    for r in rows:
        layers = speed_model.method_layers("kascade", plan, plan.model, r["topk_fraction"], 128)
        got, _ = costs.model_speedup(layers, r["topk_fraction"], 128)
        assert got == pytest.approx(r["model_speedup"], rel=1e-9)


def test_speed_model_per_method(qwen):
    plan, spec = qwen
    costs = speed_model.load_decode_costs(BENCH, spec)
    assert (costs.heads, costs.kv_heads) == (16, 2)  # nearest GQA group to 14/2
    r = costs.ratios(0.1)

    def model(name, frac=0.1):
        return costs.model_speedup(speed_model.method_layers(name, plan, spec, frac, 128), frac, 128)[0]

    assert model("dense", None) == 1.0
    assert model("kascade") == pytest.approx(24 / (r["layer0"] + 4 * r["anchor"] + 19 * r["reuse"]))
    assert model("kascade_decode_only") == model("kascade")
    assert model("omnikv") == pytest.approx(24 / (2 + 3 * r["layer0"] + 19 * r["reuse"]))
    assert model("streamingllm") == pytest.approx(1 / r["reuse"])
    assert model("kascade_all_anchors") == pytest.approx(24 / (r["layer0"] + 23 * r["anchor"]))
    for name in ("quest", "tidaldecode", "oracle", "kascade_top_p", "kascade_rerank"):
        assert model(name) is None, name
    speedup, why = costs.model_speedup(speed_model.method_layers("kascade", plan, spec, 0.05, 128), 0.05, 128)
    assert speedup is None and "no point at that fraction" in why
    with pytest.raises(ValueError, match="no decode point at context 4096"):
        speed_model.load_decode_costs(BENCH, spec, context=4096)


# ------------------------------------------------------------------------------------------ the report
def _bench_json(path: Path) -> Path:
    """A tiny `kascade bench decode` document: one 16/2/128 point at 128K batch 64, Top-k 10%."""
    row = {"batch": 64, "context": 131072, "topk_fraction": 0.1, "topk_floor": 128, "budget": 13108,
           "heads": 16, "kv_heads": 2, "head_dim": 128, "dtype": "bf16", "best_dense_ms": 2.0,
           "ratio_to_dense": {"layer0": 1.5, "anchor": 1.0, "reuse": 0.1}}
    path.write_text(json.dumps({"meta": {"bench": "decode", "env": {"device": "test GPU", "git_commit": "abc"}},
                                "rows": [row]}))
    return path


def _cells(plan_id):
    scores = {"dense": [100, 80], "kascade": [100, 60], "omnikv": [100, 70], "quest": [50, 40]}
    cells = []
    for method, per_task in scores.items():
        for task, base in zip(("niah_single", "vt"), per_task):
            for i in range(2):
                c = {"model": "qwen2.5-0.5b", "task": task, "context_length": 4096, "index": i, "seed": 0,
                     "method": method, "topk_fraction": None if method == "dense" else 0.1,
                     "topk_floor": None if method == "dense" else 128,
                     "plan_id": plan_id if method.startswith("kascade") else None, "max_new_tokens": 32,
                     "n_tokens": 4096, "new_tokens": 5, "score": float(base - 10 * i), "prediction": "x",
                     "answers": ["x"], "metric": "all"}
                if method == "omnikv":  # a newer run: the probe's measured attended fraction per layer
                    c["attended_fraction"] = [1.0] * 4 + [0.2] * 20
                cells.append(c)
    return cells


def test_report_only_writes_the_pareto_plot_and_fields(tmp_path, qwen):
    from kascade.cli import main
    from kascade.eval.runner import plan_id

    plan, spec = qwen
    out = tmp_path / "ev"
    out.mkdir()
    (out / "cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in _cells(plan_id(plan))))
    bench = _bench_json(tmp_path / "bench.json")
    argv = ["eval", "--report-only", "--model", "qwen2.5-0.5b", "--tasks", "niah_single", "vt", "--lengths", "4096",
            "--samples", "2", "--methods", "dense", "kascade", "omnikv", "quest", "--out", str(out),
            "--name", "t", "--speed-bench", str(bench)]
    assert main(argv) == 0
    doc = json.loads((out / "t.json").read_text())
    s = doc["summary"]
    rows = {r["method"]: r for r in s["rows"]}
    n_keys = [4097, 4098, 4099, 4100]  # the four decode steps of a 5-token answer
    k_frac = sum(topk_budget(n, 0.1, 128) / n for n in n_keys) / 4
    assert rows["dense"]["mean_attended_fraction"] == 1.0 and rows["dense"]["model_speedup"] == 1.0
    assert rows["kascade"]["attended_fraction_source"] == "definition"
    assert rows["kascade"]["mean_attended_fraction"] == pytest.approx((1 + 23 * k_frac) / 24, abs=1e-5)
    assert rows["kascade"]["model_speedup"] == pytest.approx(24 / (1.5 + 4 * 1.0 + 19 * 0.1), abs=1e-4)
    assert rows["kascade"]["model_kernels"] == {"layer0": 1, "anchor": 4, "reuse": 19}
    assert 0.1 < rows["kascade"]["mean_prefill_attended_fraction"] < 0.3
    assert rows["omnikv"]["attended_fraction_source"] == "measured"
    assert rows["omnikv"]["mean_attended_fraction"] == pytest.approx((4 + 20 * 0.2) / 24, abs=1e-5)
    assert rows["omnikv"]["model_speedup"] == pytest.approx(24 / (2 + 3 * 1.5 + 19 * 0.1), abs=1e-4)
    assert rows["omnikv"]["mean_prefill_attended_fraction"] == 1.0
    assert "model_speedup" not in rows["quest"] and "mean_attended_fraction" in rows["quest"]
    # averages: dense 85, kascade 75, omnikv 80, quest 40 -> dense (1.0 keys), omnikv (0.33), kascade (0.14)
    # on the attended-key front; quest (0.17 keys, 40) is dominated by kascade
    assert s["pareto"] == [{"context_length": 4096,
                            "mean_attended_fraction": ["kascade@0.1", "omnikv@0.1", "dense"],
                            "model_speedup": ["dense", "omnikv@0.1", "kascade@0.1"]}]
    model = s["decode_speed_model"]
    assert model["source"].endswith("bench.json") and len(model["sha256"]) == 64
    assert (model["heads"], model["kv_heads"], model["context"], model["batch"]) == (16, 2, 131072, 64)
    assert model["methods"]["quest"].startswith("not modelled")
    png = out / "t_4096_pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    md = (out / "t_pareto.md").read_text()
    assert "| 4096 | kascade@0.1 | 75.0 |" in md and "test GPU" in md


def test_report_only_explicit_bad_bench_is_an_error(tmp_path, qwen):
    from kascade.cli import main
    from kascade.eval.runner import plan_id

    plan, _ = qwen
    out = tmp_path / "ev"
    out.mkdir()
    (out / "cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in _cells(plan_id(plan))))
    argv = ["eval", "--report-only", "--model", "qwen2.5-0.5b", "--tasks", "niah_single", "vt", "--lengths", "4096",
            "--samples", "2", "--methods", "dense", "kascade", "--out", str(out), "--name", "t",
            "--speed-bench", str(_bench_json(tmp_path / "bench.json")), "--speed-batch", "1"]
    with pytest.raises(SystemExit, match="no decode point at context 131072, batch 1"):
        main(argv)
    # without a bench the chart keeps its attended-key panel and says why the speedup is missing
    assert main(argv[:-4] + ["--speed-bench", "none"]) == 0
    doc = json.loads((out / "t.json").read_text())
    assert all("model_speedup" not in r for r in doc["summary"]["rows"])
    assert doc["summary"]["decode_speed_model"]["note"].startswith("--speed-bench none")
    assert (out / "t_4096_pareto.png").is_file()
