"""The end-to-end path: Engine plan/run (against the validated per-call path, Triton under the
interpreter), KascadeCache (against transformers' DynamicCache), the Generator (against generate()),
sampling, and the errors of each."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kascade  # noqa: E402
from kascade import Engine, KascadeInputError, ModelSpec, Plan  # noqa: E402
from kascade.engine import Step  # noqa: E402
from kascade.generation import Generator, sample_next  # noqa: E402
from kascade.integrations.cache import KascadeCache  # noqa: E402
from test_hf import left_pad, plan_for, prompt, tiny_model  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------- Engine plan / run
def _layers_inputs(B, Hq, Hkv, Lq, Lk, D, n_layers, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_layers):
        q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
        k = (torch.randn(B, Hkv, Lk, D, generator=g) * 2).to(dtype)
        v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
        out.append((q, k, v))
    return out


def _engine_plan(Hq, Hkv, D, n_layers, fraction, tile):
    spec = ModelSpec("toy", n_layers, Hq, Hkv, D, name="toy")
    head_map = [tuple(range(Hkv))] * n_layers
    head_map[1] = tuple(reversed(range(Hkv)))  # a non-identity map, read inside the reuse kernels
    head_map[3] = (0,) * Hkv
    return Plan(spec, anchor_layers=(0, 2), head_map=tuple(head_map), topk_fraction=fraction, topk_floor=16,
                tile_size=tile)


@pytest.mark.skipif(not INTERPRET, reason="needs the Triton interpreter (TRITON_INTERPRET=1, set without CUDA)")
@pytest.mark.parametrize("phase", ["decode", "prefill", "chunk"])
@pytest.mark.parametrize("variant,sparse_prefill", [("kascade", True), ("kascade", False), ("dense", True),
                                                    ("no_remap", True)])
def test_run_equals_validated_call(phase, variant, sparse_prefill):
    """begin/run (Triton launchers, head map in the kernel, host lengths, K/V wider than the keys) gives
    what the validated per-call path gives, layer by layer, on a batch of different lengths."""
    B, Hq, Hkv, D, n_layers, T = 2, 8, 2, 64, 4, 16
    plan = _engine_plan(Hq, Hkv, D, n_layers, 0.25, T)
    ends = (150, 150)
    starts = (0, 37)  # row 1 left-padded
    Lq = {"decode": 1, "prefill": 150, "chunk": 64}[phase]
    capacity = 170  # the cache is wider than the keys
    layers = _layers_inputs(B, Hq, Hkv, Lq, capacity, D, n_layers, torch.float16)
    kv_start = torch.tensor(starts)
    kv_end = torch.tensor(ends)
    lengths = tuple(e - s for s, e in zip(starts, ends))
    fast = Engine(plan, variant=variant, sparse_prefill=sparse_prefill, backend="triton")
    slow = Engine(plan, variant=variant, sparse_prefill=sparse_prefill, backend="triton")
    step = Step(kv_start, kv_end, Lq, lengths=None if phase == "decode" else lengths,
                kv_length=None if phase == "decode" else ends[0])
    fast.begin(step, layers[0][0], layers[0][1])
    assert fast._fast
    for j, (q, k, v) in enumerate(layers):
        got = fast.run(j, q, k, v)
        kk, vv = (k, v) if phase == "decode" else (k[:, :, : ends[0]], v[:, :, : ends[0]])
        want = slow(j, q, kk, vv, kv_start, kv_end)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3, msg=f"layer {j}")


def test_run_needs_begin_and_a_valid_step():
    plan = _engine_plan(8, 2, 64, 4, 0.25, 16)
    eng = Engine(plan)
    q, k, v = _layers_inputs(1, 8, 2, 1, 40, 64, 1, torch.float32)[0]
    with pytest.raises(KascadeInputError, match="begin"):
        eng.run(0, q, k, v)
    with pytest.raises(KascadeInputError, match="kv_end must be int64"):
        eng.begin(Step(torch.zeros(1, dtype=torch.long), torch.full((1,), 40, dtype=torch.int32), 1), q, k)
    with pytest.raises(KascadeInputError, match="host lengths"):
        qp = torch.randn(1, 8, 8, 64)
        eng.begin(Step(torch.zeros(1, dtype=torch.long), torch.full((1,), 40), 8), qp, k)
    with pytest.raises(KascadeInputError, match="queries per row"):
        eng.begin(Step(torch.zeros(1, dtype=torch.long), torch.full((1,), 40), 8, lengths=(40,)), q, k)
    with pytest.raises(KascadeInputError, match="kv_length=99"):
        eng.begin(Step(torch.zeros(1, dtype=torch.long), torch.full((1,), 40), 1, kv_length=99), q, k)


def test_run_on_cpu_is_the_validated_path():
    """Without Triton kernels (the reference backend), run() is exactly the per-call path."""
    plan = _engine_plan(8, 2, 64, 4, 0.25, 16)
    fast, slow = Engine(plan, backend="reference"), Engine(plan, backend="reference")
    layers = _layers_inputs(1, 8, 2, 1, 90, 64, 4, torch.float32)
    s, e = torch.zeros(1, dtype=torch.long), torch.full((1,), 80)
    fast.begin(Step(s, e, 1), layers[0][0], layers[0][1])
    assert not fast._fast
    for j, (q, k, v) in enumerate(layers):
        assert torch.equal(fast.run(j, q, k, v), slow(j, q, k, v, s, e))


# ------------------------------------------------------------------------------- KascadeCache
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_cache_logits_equal_dynamic_cache(family):
    """Prefill + decode logits through a KascadeCache equal DynamicCache's, dense (sdpa) and Kascade."""
    model = tiny_model(family)
    ids = prompt(37, 1)
    for enable in (False, True):
        if enable:
            kascade.enable(model, plan_for(model, 0.3))
        with torch.no_grad():
            dyn = transformers.DynamicCache(config=model.config)
            ours = KascadeCache(model, 1, 48)
            for cache in (dyn, ours):
                cache_logits = []
                out = model(ids, past_key_values=cache, use_cache=True)
                cache_logits.append(out.logits[:, -1])
                nxt = out.logits[:, -1:].argmax(-1)
                for _ in range(4):
                    out = model(nxt, past_key_values=cache, use_cache=True)
                    cache_logits.append(out.logits[:, -1])
                    nxt = out.logits[:, -1:].argmax(-1)
                if cache is dyn:
                    want = torch.stack(cache_logits)
                else:
                    got = torch.stack(cache_logits)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert ours.length == 41 and int(ours.kv_end[0]) == 41


def test_cache_in_generate_left_padded():
    """generate() with a KascadeCache (past_key_values) gives generate()'s tokens, left-padded batch."""
    model = tiny_model("llama")
    kascade.enable(model, plan_for(model, 0.3))
    ids, mask = left_pad([prompt(30, 2), prompt(41, 3)])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        cache = KascadeCache(model, 2, 64)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert torch.equal(got, want)
    assert cache.host_start == [11, 0]


def test_cache_errors():
    model = tiny_model("llama")
    cache = KascadeCache(model, 2, 16)
    with pytest.raises(KascadeInputError, match="left padding"):
        cache.set_padding(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(KascadeInputError, match=r"must be \[2, L\]"):
        cache.set_padding(torch.ones(3, 4))
    with pytest.raises(KascadeInputError, match="no token"):
        cache.set_padding(torch.tensor([[0, 0], [1, 1]]))
    with pytest.raises(KascadeInputError, match="holds 16 tokens"):
        with torch.no_grad():
            model(prompt(17, 0).repeat(2, 1), past_key_values=cache, use_cache=True)
    with pytest.raises(KascadeInputError, match="positive"):
        KascadeCache(model, 0, 16)


# ------------------------------------------------------------------------------- Generator
@pytest.mark.parametrize("variant,fraction", [("kascade", 0.3), ("kascade", 1.0), ("dense", 0.3)])
@pytest.mark.parametrize("chunk", [64, 128])
def test_generator_equals_generate(variant, fraction, chunk):
    """Greedy tokens of the Generator (tile-aligned chunked prefill, cache, decode steps) equal
    transformers' generate() with the same attention."""
    model = tiny_model("qwen2")
    kascade.enable(model, plan_for(model, fraction), variant=variant)
    ids = prompt(150, 4)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
    gen = Generator(model, batch_size=1, capacity=160, prefill_chunk=chunk)
    res = gen.generate(ids, max_new_tokens=8)
    assert torch.equal(res.tokens, want)
    assert res.ttft_s > 0 and res.decode_s > 0 and res.decode_steps == 7
    # a second call on the same Generator starts from an empty cache
    assert torch.equal(gen.generate(ids, max_new_tokens=8).tokens, want)


def test_generator_left_padded_and_eos():
    model = tiny_model("llama")
    kascade.enable(model, plan_for(model, 0.3))
    ids, mask = left_pad([prompt(30, 2), prompt(41, 3)])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, 41:]
    gen = Generator(model, batch_size=2, capacity=64)
    res = gen.generate(ids, mask, max_new_tokens=6)
    assert torch.equal(res.tokens, want)
    # stopping: make the second token of row 0 the EOS of both rows
    eos = int(want[0, 1])
    res = gen.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, check_every=1)
    assert res.tokens.shape[1] <= 6 and (res.tokens[0, 1:] == eos).all()


def test_generator_errors():
    model = tiny_model("llama")
    kascade.enable(model, plan_for(model, 0.3))
    gen = Generator(model, batch_size=1, capacity=32)
    with pytest.raises(KascadeInputError, match="exceed the cache capacity"):
        gen.generate(prompt(30, 0), max_new_tokens=8)
    with pytest.raises(KascadeInputError, match="batch 2; this Generator serves 1..1"):
        gen.generate(prompt(10, 0).repeat(2, 1), max_new_tokens=2)
    with pytest.raises(KascadeInputError, match="temperature"):
        gen.generate(prompt(10, 0), max_new_tokens=2, do_sample=True, temperature=0.0)


def test_sample_next():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0], [2.0, 0.0, 0.0, 5.0]])
    assert sample_next(logits, do_sample=False, temperature=1.0, top_p=1.0).tolist() == [1, 3]
    # a tiny nucleus keeps only the most likely token
    torch.manual_seed(0)
    for _ in range(5):
        assert sample_next(logits, do_sample=True, temperature=1.0, top_p=0.01).tolist() == [1, 3]
    # sampling follows softmax(logits / T): frequencies within 3 standard errors
    torch.manual_seed(0)
    n = 4000
    draws = torch.stack([sample_next(logits[:1], do_sample=True, temperature=2.0, top_p=1.0) for _ in range(n)])
    p = torch.softmax(logits[0] / 2.0, -1)
    freq = torch.bincount(draws.flatten(), minlength=4).float() / n
    assert ((freq - p).abs() <= 3 * (p * (1 - p) / n).sqrt() + 1e-3).all(), (freq, p)


def test_generator_needs_kascade_enabled():
    with pytest.raises(KascadeInputError, match="enable"):
        Generator(tiny_model("llama"), batch_size=1, capacity=32)


def test_warmup_returns_a_ready_generator():
    model = tiny_model("llama")
    kascade.enable(model, plan_for(model, 0.3))
    gen = kascade.warmup(model, capacity=256, prompt_length=128)
    assert isinstance(gen, kascade.Generator) and gen.prefill_chunk == 128
    assert gen.generate(prompt(100, 1), max_new_tokens=3).tokens.shape == (1, 3)


def test_compile_needs_the_graph():
    model = tiny_model("llama")
    kascade.enable(model, plan_for(model, 0.3))
    with pytest.raises(KascadeInputError, match="compile=True needs"):
        Generator(model, batch_size=1, capacity=32, compile=True)


def test_generator_serves_smaller_batches_of_its_bucket():
    """A Generator of 3 rows runs a batch of 2 (padded to its bucket) with the tokens of a 2-row one."""
    model = tiny_model("llama")
    kascade.enable(model, plan_for(model, 0.3))
    ids, mask = left_pad([prompt(30, 2), prompt(41, 3)])
    want = Generator(model, batch_size=2, capacity=64).generate(ids, mask, max_new_tokens=5).tokens
    got = Generator(model, batch_size=3, capacity=64).generate(ids, mask, max_new_tokens=5).tokens
    assert got.shape == (2, 5) and torch.equal(got, want)
