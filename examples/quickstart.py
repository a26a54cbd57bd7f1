"""The README's API example: Kascade's ops and engine on random tensors, CPU only."""

import torch

import kascade
from kascade import reference

torch.manual_seed(0)
B, Hq, Hkv, L, D = 2, 8, 2, 2048, 64
q = torch.randn(B, Hq, L, D)
k = torch.randn(B, Hkv, L, D)
v = torch.randn(B, Hkv, L, D)
kv_start = torch.tensor([0, 300])  # row 1 is left-padded by 300 tokens
# Random keys give flat attention; a few "heavy" keys make it peaked, as in a trained model.
k[:, :, ::97] *= 4

dense = kascade.dense_attention(q, k, v, kv_start)

# fraction 1.0: every tile keeps its whole prefix, so Kascade is exactly dense attention
out, indices = kascade.anchor_attention(q, k, v, kv_start, topk_fraction=1.0, tile_size=32)
print(f"max |kascade - dense| at topk_fraction=1.0: {(out - dense).abs().max().item():.2e}")

# fraction 0.1 (floor 128): rolling prefill Top-k, each tile of 32 queries x GQA group shares a set
budget = dict(topk_fraction=0.1, topk_floor=128, tile_size=32)
out, indices = kascade.anchor_attention(q, k, v, kv_start, **budget)
mass, attended, visible = reference.selection_stats(q, k, indices, kv_start, **budget)
valid = visible > 0
print(f"at topk_fraction=0.1: attended {attended[valid].sum() / visible[valid].sum():.1%} of visible keys, "
      f"captured {mass[valid].mean():.1%} of the attention mass")

# A reuse layer attends over an anchor's indices through the head map (here: swap the two KV heads)
reuse = kascade.sparse_attention(q, k, v, indices[:, [1, 0]], kv_start, **budget)
print("reuse output", tuple(reuse.shape))
