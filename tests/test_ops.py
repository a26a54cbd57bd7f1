"""The public ops: dispatch on CPU (reference) and their input errors."""

from __future__ import annotations

import pytest
import torch

import kascade
from kascade import KascadeInputError, reference


def make(Lq=40, Lk=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 8, Lq, 64, generator=g), torch.randn(2, 2, Lk, 64, generator=g),
            torch.randn(2, 2, Lk, 64, generator=g))


@pytest.mark.parametrize("Lq", [1, 40])
def test_ops_match_reference_on_cpu(Lq):
    q, k, v = make(Lq)
    kv_start = torch.tensor([0, 5])
    kw = dict(topk_fraction=0.1, topk_floor=4, tile_size=8)
    out, idx = kascade.anchor_attention(q, k, v, kv_start, **kw)
    if Lq == 1:
        ref_idx = reference.select_decode(q, k, kv_start, None, topk_fraction=0.1, topk_floor=4)
    else:
        ref_idx = reference.select_prefill(q, k, kv_start, None, **kw)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(out, reference.sparse_attention(q, k, v, idx, kv_start, None, **kw))
    dense_out, _ = kascade.anchor_attention(q, k, v, kv_start, dense_output=True, **kw)
    torch.testing.assert_close(dense_out, kascade.dense_attention(q, k, v, kv_start))
    torch.testing.assert_close(kascade.sparse_attention(q, k, v, idx, kv_start, **kw), out)


def test_all_heads_pooled_indices_broadcast():
    q, k, v = make(1)
    out, idx = kascade.anchor_attention(q, k, v, head_pooling="all", topk_floor=4)
    assert idx.shape[1] == 1
    torch.testing.assert_close(out, kascade.sparse_attention(q, k, v, idx.expand(-1, 2, -1), topk_floor=4))


def test_backend_errors(monkeypatch):
    q, k, v = make(1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KascadeInputError, match="backend='triton' needs triton and CUDA tensors"):
        kascade.dense_attention(q, k, v, backend="triton")
    with pytest.raises(KascadeInputError, match="backend='cuda'; expected one of"):
        kascade.dense_attention(q, k, v, backend="cuda")
    monkeypatch.setenv("KASCADE_BACKEND", "fast")
    with pytest.raises(KascadeInputError, match="KASCADE_BACKEND='fast'"):
        kascade.dense_attention(q, k, v)


def test_input_errors():
    q, k, v = make(1)
    with pytest.raises(KascadeInputError, match="indices must be int32 or int64, got torch.float32"):
        kascade.sparse_attention(q, k, v, torch.zeros(2, 2, 4))
    with pytest.raises(KascadeInputError, match="indices have 3 heads, expected 2 KV heads or 1"):
        kascade.sparse_attention(q, k, v, torch.zeros(2, 3, 4, dtype=torch.int32))
    with pytest.raises(KascadeInputError, match="indices have batch 1, q has batch 2"):
        kascade.sparse_attention(q, k, v, torch.zeros(1, 2, 4, dtype=torch.int32))
    with pytest.raises(KascadeInputError, match=r"decode indices must be \[B, Hsel, k\] with B=2, Hsel=2 \(KV heads\) "
                       r"or 1; got \(2, 2, 1, 4\)"):
        kascade.sparse_attention(q, k, v, torch.zeros(2, 2, 1, 4, dtype=torch.int32))
    with pytest.raises(KascadeInputError, match="tile_size must be a positive integer, got 0"):
        kascade.anchor_attention(q, k, v, tile_size=0)
    with pytest.raises(KascadeInputError, match="q, k, v must be on one device"):
        kascade.dense_attention(q, k.to("meta"), v)


@pytest.mark.parametrize("backend", ["reference", None])
def test_prefill_indices_with_too_few_tiles(backend):
    """Was a raw IndexError: rows of 40 keys in tiles of 8 need 5 tiles of indices."""
    q, k, v = make(40)
    with pytest.raises(KascadeInputError, match=r"indices have 2 tiles, the longest row needs 5: prefill indices "
                       r"must be \[B, Hsel, n_tiles, k\] with B=2, Hsel=2 \(KV heads\) or 1, n_tiles >= 5"):
        kascade.sparse_attention(q, k, v, torch.zeros(2, 2, 2, 4, dtype=torch.int32), tile_size=8, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Lq", [1, 7, 40])
def test_sdpa_dense_path_matches_reference(dtype, Lq, monkeypatch):
    q, k, v = (t.to(dtype) for t in make(Lq, 40, seed=3))
    kv_start, kv_end = torch.tensor([0, 30]), torch.tensor([40, 38])
    from kascade import attention as ops
    monkeypatch.setattr(ops, "_kernels", lambda phase: None)
    out = ops.dense_attention(q, k, v, kv_start, kv_end)  # CPU "auto": the SDPA path
    ref = reference.dense_attention(q, k, v, kv_start, kv_end)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("Lq", [1, 7, 40])
def test_sdpa_sparse_path_matches_reference(Lq, monkeypatch):
    q, k, v = make(Lq, 40, seed=4)
    kv_start, kv_end = torch.tensor([0, 9]), torch.tensor([40, 40])
    kw = dict(topk_fraction=0.1, topk_floor=3, tile_size=4)
    from kascade import attention as ops
    monkeypatch.setattr(ops, "_kernels", lambda phase: None)
    idx = (reference.select_decode(q, k, kv_start, kv_end, topk_fraction=0.1, topk_floor=3) if Lq == 1
           else reference.select_prefill(q, k, kv_start, kv_end, **kw))
    out = ops.sparse_attention(q, k, v, idx, kv_start, kv_end, **kw)
    ref = reference.sparse_attention(q, k, v, idx, kv_start, kv_end, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_ops_use_no_reference_internals_and_the_reference_is_a_leaf():
    """The fast path (kascade.ops, kascade.kernels) never imports the reference; kascade.attention, the
    public ops, reaches it only through its public functions (the checks, budget and masks are shared
    modules); the reference imports nothing from the ops, engine or kernels."""
    import ast
    import pathlib

    src = pathlib.Path(kascade.__file__).parent
    for path in sorted([*(src / "ops").glob("*.py"), *(src / "kernels").glob("*.py")]):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([node.module or ""] + [a.name for a in node.names] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n == "reference" or n.endswith(".reference") for n in names):
                pytest.fail(f"{path.parent.name}/{path.name}:{node.lineno} imports the reference")
    tree = ast.parse((src / "attention.py").read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "reference" and node.attr.startswith("_")):
            pytest.fail(f"attention.py:{node.lineno}: reference.{node.attr}")
    tree = ast.parse((src / "reference.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert imported == {"budget", "masks", "validation"}


def test_old_ops_names_still_work_with_a_deprecation_warning():
    import kascade.ops

    with pytest.warns(DeprecationWarning, match="kascade.attention.dense_attention"):
        fn = kascade.ops.dense_attention
    assert fn is kascade.attention.dense_attention
    with pytest.raises(AttributeError):
        kascade.ops.no_such_name  # noqa: B018
