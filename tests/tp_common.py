"""Shared by tests/test_tp.py and its worker processes (tests/tp_worker.py)."""

from __future__ import annotations

import torch


def tiny_llama():
    """4 query heads, 2 KV heads, 2 layers, hidden 64, head dim 16, vocab 128; sharpened queries so sparse
    selection matters (random init attends near-uniformly)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=127)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "q_proj"):
                m.q_proj.weight.mul_(4.0)
    return model


def prompt() -> torch.Tensor:
    g = torch.Generator().manual_seed(17)
    return torch.randint(2, 126, (1, 48), generator=g)


def greedy_logits(model, steps: int) -> torch.Tensor:
    """Logits [1 + steps, vocab] of the prefill's last position and ``steps`` greedy decode steps (DynamicCache)."""
    from transformers import DynamicCache

    from kascade.generation import _cache_kwarg

    ids = prompt()
    cache = DynamicCache(config=model.config)
    key = _cache_kwarg(model)
    out = []
    with torch.no_grad():
        logits = model(ids, use_cache=True, **{key: cache}).logits[:, -1]
        for _ in range(steps + 1):
            logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
            out.append(logits[0].clone())
            if len(out) > steps:
                break
            nxt = logits.argmax(-1, keepdim=True)
            logits = model(nxt, use_cache=True, **{key: cache}).logits[:, -1]
    return torch.stack(out)
