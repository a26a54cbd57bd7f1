"""Kascade under tensor parallelism (issue 17): per-rank plans and engines on head slices equal the full
computation; transformers' TP (gloo, 2 CPU processes) gives the single-process logits."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from kascade import Engine, ModelSpec, Plan, PlanError

SPEC = ModelSpec("llama", 4, 8, 4, 16)
SHARD2_MAP = ((0, 1, 2, 3), (1, 1, 3, 2), (0, 1, 2, 3), (0, 0, 2, 2))  # valid for TP 2 (shards {0,1}, {2,3})
CROSS_MAP = ((0, 1, 2, 3), (1, 1, 3, 2), (0, 1, 2, 3), (0, 2, 2, 3))  # layer 3: head 1 -> head 2 (other shard)


def _layers(B=2, L=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(SPEC.num_layers):
        q = torch.randn(B, SPEC.num_heads, L, 16, generator=g) * 3
        k = torch.randn(B, SPEC.num_kv_heads, L, 16, generator=g)
        v = torch.randn(B, SPEC.num_kv_heads, L, 16, generator=g)
        out.append((q, k, v))
    return out


def _run(engine, layers, qs=slice(None), ks=slice(None), decode=False):
    B, L = layers[0][0].shape[0], layers[0][1].shape[2]
    s0 = torch.tensor([0, 5])[:B]
    s1 = torch.full((B,), L)
    outs = []
    for j, (q, k, v) in enumerate(layers):
        q = q[:, qs, -1:] if decode else q[:, qs]
        outs.append(engine(j, q, k[:, ks], v[:, ks], s0, s1))
    return torch.stack(outs)


@pytest.mark.parametrize("decode", [False, True])
def test_shard_engines_on_head_slices_equal_the_full_engine(decode):
    plan = Plan(SPEC, (0, 2), SHARD2_MAP, topk_fraction=0.3, topk_floor=4, tile_size=8)
    layers = _layers()
    full = _run(Engine(plan), layers, decode=decode)
    for t in (1, 2):
        parts = []
        for rank in range(t):
            hq, hkv = SPEC.num_heads // t, SPEC.num_kv_heads // t
            parts.append(_run(Engine(plan.shard(rank, t)), layers, slice(rank * hq, (rank + 1) * hq),
                              slice(rank * hkv, (rank + 1) * hkv), decode=decode))
        torch.testing.assert_close(torch.cat(parts, dim=2), full, rtol=0, atol=1e-6)
    # the identity map ignores the remap: a different output, so the comparison above can fail
    other = _run(Engine(Plan.identity(SPEC, (0, 2), topk_fraction=0.3, topk_floor=4, tile_size=8)), layers,
                 decode=decode)
    assert not torch.allclose(other[1], full[1], atol=1e-3)


def _fake_module(layer, state):
    return types.SimpleNamespace(layer_idx=layer, _kascade_state=state, training=False)


def test_hf_attention_learns_the_shard(monkeypatch):
    """The HF attention function given one rank's heads runs plan.shard(rank, t), built once per (rank, t)."""
    from kascade.integrations import hf

    plan = Plan(SPEC, (0, 2), SHARD2_MAP, topk_fraction=0.3, topk_floor=4, tile_size=8)
    full_engine = Engine(plan)
    state = hf._State(method=full_engine, spec=SPEC, previous_implementation="sdpa")
    layers = _layers(B=1, seed=3)
    want = _run(full_engine, layers).transpose(2, 3)  # [layer, B, L, H, D] like the HF output
    got = []
    for rank in range(2):
        monkeypatch.setattr(hf, "_tp_rank", lambda module, t, rank=rank: rank)
        outs = []
        for j, (q, k, v) in enumerate(layers):
            sl_q, sl_k = slice(4 * rank, 4 * rank + 4), slice(2 * rank, 2 * rank + 2)
            out, _ = hf.kascade_attention_forward(_fake_module(j, state), q[:, sl_q], k[:, sl_k], v[:, sl_k], None)
            outs.append(out)
        got.append(torch.stack(outs))
    torch.testing.assert_close(torch.cat(got, dim=3), want, rtol=0, atol=1e-6)
    assert sorted(state.shards) == [(0, 2), (1, 2)]
    assert state.shards[(1, 2)].plan == plan.shard(1, 2)
    engine = state.shards[(0, 2)]
    q, k, v = layers[0]
    hf.kascade_attention_forward(_fake_module(0, state), q[:, :4], k[:, :2], v[:, :2], None)
    assert state.shards[(0, 2)] is engine  # cached, not rebuilt


def test_hf_attention_refuses_cross_shard_plans_and_unknown_shards(monkeypatch):
    from kascade.integrations import hf

    q, k, v = _layers(B=1)[0]
    state = hf._State(method=Engine(Plan(SPEC, (0, 2), CROSS_MAP)), spec=SPEC, previous_implementation="sdpa")
    # no torch.distributed: the shard can not be learnt
    with pytest.raises(PlanError, match="cannot learn this process's shard: torch.distributed is not initialised"):
        hf.kascade_attention_forward(_fake_module(0, state), q[:, :4], k[:, :2], v[:, :2], None)
    monkeypatch.setattr(hf, "_tp_rank", lambda module, t: 0)
    with pytest.raises(PlanError, match=r"layer 3 KV head 1 \(shard 0\) reuses KV head 2 \(shard 1\)"):
        hf.kascade_attention_forward(_fake_module(0, state), q[:, :4], k[:, :2], v[:, :2], None)
    with pytest.raises(PlanError, match="not an even tensor-parallel split"):
        hf.kascade_attention_forward(_fake_module(0, state), q[:, :3], k[:, :2], v[:, :2], None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_transformers_tp_gloo_two_processes_equals_one(tmp_path):
    """transformers' own TP (DistributedConfig(tp_plan="auto"), gloo, 2 CPU processes) with Kascade enabled
    on a shard-valid plan: prefill + greedy decode logits equal the single-process run; a plan whose head map
    crosses the shards raises PlanError on every rank."""
    transformers = pytest.importorskip("transformers")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import kascade
    from kascade.integrations import hf

    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    from tp_common import greedy_logits, tiny_llama

    model = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    spec = hf.model_spec(model)
    # 2 KV heads over 2 ranks: one KV head per shard, so the shard-valid map of the reuse layer is the identity
    good = Plan(spec, (0,), ((0, 1), (0, 1)), topk_fraction=0.3, topk_floor=4, tile_size=8, tp_sizes=(1, 2))
    cross = Plan(spec, (0,), ((0, 1), (1, 0)), topk_fraction=0.3, topk_floor=4, tile_size=8)
    good.save(tmp_path / "good.json")
    cross.save(tmp_path / "cross.json")
    steps = 4
    kascade.enable(model, good)
    want = greedy_logits(model, steps)
    hf.disable(model)
    dense = greedy_logits(model, steps)
    assert not torch.allclose(want, dense, atol=1e-3)  # Kascade is sparse here: the comparison can fail

    port = str(_free_port())
    env_base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", OMP_NUM_THREADS="1",
                    PYTHONPATH=os.pathsep.join([str(here.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    procs = []
    for rank in range(2):
        env = dict(env_base, RANK=str(rank), LOCAL_RANK=str(rank))
        cmd = [sys.executable, str(here / "tp_worker.py"), str(tmp_path / "model"), str(tmp_path / "good.json"),
               str(tmp_path / "cross.json"), str(tmp_path / f"rank{rank}.pt"), str(steps)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0])
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{logs[rank][-3000:]}"
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "error" not in res, res["error"]
        assert res["q_proj_weight"] == "DTensor"  # transformers really sharded the model
        assert res["shards"] == {f"{rank},2": [[0], [0]]}  # the attention got 2 of 4 query heads, 1 of 2 KV
        torch.testing.assert_close(res["logits"], want, rtol=0, atol=1e-4)
        assert res["cross_error"] is not None and "crosses tensor-parallel shards at TP size 2" in res["cross_error"]
        assert "layer 1 KV head 0 (shard 0) reuses KV head 1 (shard 1) of anchor layer 0 (and 1 more)" \
            in res["cross_error"]
