"""Calibration statistics from dense runs of a model over a development set.

For every prompt the model runs densely (prefill, batch 1) with :class:`StatsCollector` as its attention
method. Per layer b, KV head h and query tile t (T tokens x the GQA group, pooled post-softmax, exactly
the rolling-prefill pooling), the collector takes the Top-k keys (k = ``stats_k``, 64) of the tile's
prefix. For every earlier-or-same layer a and head g, the similarity is

    sim[a, b, h, g] = mass of (b, h)'s pooled distribution on (a, g)'s Top-k
                      / mass of (b, h)'s pooled distribution on its own Top-k,

minimised over the query tiles of the prompt (tiles whose prefix fits in k are trivially 1 and skipped),
then averaged over prompts. The collector also computes the dense attention output from the same
probabilities, so a calibration pass costs about one eager forward. Scores are formed a chunk of query
tiles at a time: no layer's full L x L matrix is ever held.

Layer importance w_j = 1 - cos(x_j, x_j + attn_j(x_j)) per token (x_j: the residual stream entering
layer j), averaged over tokens, then over prompts, is gathered by hooks on the decoder layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..plan import ModelSpec

# Scores of one chunk stay under ~16M floats (64 MB).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class CalibrationStats:
    """Everything the anchor search and head map need, aggregated over the development set.

    similarity: [L, L, H, H] float64, similarity[a, b, h, g] (defined for a <= b; 0 elsewhere), the mean
    over prompts of the per-prompt minimum over query tiles. importance: [L] float64 (w_j).
    """

    spec: ModelSpec
    similarity: torch.Tensor
    importance: torch.Tensor
    num_prompts: int
    num_tokens: int
    stats_k: int
    tile_size: int
    info: dict[str, Any] = field(default_factory=dict)

    def layer_similarity(self) -> torch.Tensor:
        """[L, L]: mean over reuse heads h of max over anchor heads g (head remapping), a <= b."""
        return self.similarity.amax(dim=3).mean(dim=2)

    def weighted_similarity(self) -> torch.Tensor:
        """[L, L]: S[a][j] * w_j, the objective of the anchor dynamic program."""
        return self.layer_similarity() * self.importance[None, :]

    def save(self, path: str | Path) -> None:
        from dataclasses import asdict

        torch.save({"spec": asdict(self.spec), "similarity": self.similarity, "importance": self.importance,
                    "num_prompts": self.num_prompts, "num_tokens": self.num_tokens, "stats_k": self.stats_k,
                    "tile_size": self.tile_size, "info": self.info}, path)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationStats":
        d = torch.load(path, weights_only=True)
        d["spec"] = ModelSpec(**d["spec"])
        return cls(**d)


class StatsCollector:
    """An attention method (for ``kascade.enable``) that attends densely and records calibration statistics.

    Call ``begin_prompt()`` before and ``end_prompt()`` after each single-prompt forward pass.
    """

    def __init__(self, spec: ModelSpec, *, stats_k: int = 64, tile_size: int = 32) -> None:
        self.spec = spec
        self.stats_k = stats_k
        self.tile_size = tile_size
        L, H = spec.num_layers, spec.num_kv_heads
        self.sim_sum = torch.zeros(L, L, H, H, dtype=torch.float64)
        self.importance_sum = torch.zeros(L, dtype=torch.float64)
        self.num_prompts = 0
        self.num_tokens = 0
        self._prompt_min: torch.Tensor | None = None
        self._indices: dict[int, torch.Tensor] = {}
        self._importance: dict[int, float] = {}
        self._length = 0

    # ------------------------------------------------------------------ per prompt
    def begin_prompt(self) -> None:
        L, H = self.spec.num_layers, self.spec.num_kv_heads
        self._prompt_min = torch.full((L, L, H, H), math.inf, dtype=torch.float32)
        self._indices = {}
        self._importance = {}
        self._length = 0

    def end_prompt(self) -> bool:
        """Fold the prompt into the totals. Returns False (and skips it) if it was too short to have a
        tile whose prefix exceeds stats_k."""
        done = self._prompt_min
        self._prompt_min = None
        L = self.spec.num_layers
        if done is None or len(self._importance) != L:
            raise RuntimeError("end_prompt() without a complete forward pass since begin_prompt()")
        upper = torch.triu(torch.ones(L, L, dtype=torch.bool))
        if not torch.isfinite(done[upper]).all():
            return False
        self.sim_sum += torch.where(upper[:, :, None, None], done.double(), 0.0)
        self.importance_sum += torch.tensor([self._importance[j] for j in range(L)], dtype=torch.float64)
        self.num_prompts += 1
        self.num_tokens += self._length
        return True

    def record_importance(self, layer: int, x: torch.Tensor, attn_out: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(x.double(), (x + attn_out).double(), dim=-1)
        self._importance[layer] = float(1.0 - cos.mean())

    def result(self, info: dict[str, Any] | None = None) -> CalibrationStats:
        if self.num_prompts == 0:
            raise ValueError(f"no prompt was long enough: each needs more than {self.stats_k + self.tile_size} tokens")
        return CalibrationStats(
            spec=self.spec, similarity=self.sim_sum / self.num_prompts,
            importance=self.importance_sum / self.num_prompts, num_prompts=self.num_prompts,
            num_tokens=self.num_tokens, stats_k=self.stats_k, tile_size=self.tile_size, info=dict(info or {}),
        )

    # ------------------------------------------------------------------ the attention method
    def __call__(self, layer, q, k, v, kv_start=None, kv_end=None, *, scale=None) -> torch.Tensor:
        B, Hq, Lq, D = q.shape
        Hkv, L = k.shape[1], k.shape[2]
        if B != 1 or Lq != L or (kv_start is not None and int(kv_start[0]) != 0):
            raise ValueError(
                f"calibration runs one unpadded prompt per forward (prefill, no cache); got batch {B}, "
                f"{Lq} queries for {L} keys"
            )
        if self._prompt_min is None:
            raise RuntimeError("call begin_prompt() before the forward pass")
        self._length = L
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        G, T, kk = Hq // Hkv, self.tile_size, self.stats_k
        qf = q[0].float().reshape(Hkv, G, L, D)
        kf, vf = k[0].float(), v[0].float()
        out = torch.empty(Hkv, G, L, D, dtype=torch.float32, device=q.device)
        n_tiles = -(-L // T)
        first_stat = kk // T + 1  # first tile whose prefix (t*T keys) exceeds k
        layer_idx = torch.full((Hkv, max(0, n_tiles - first_stat), kk), -1, dtype=torch.long, device=q.device)
        tiles_per_chunk = max(1, _CHUNK_ELEMENTS // (Hq * L * T))
        keys = torch.arange(L, device=q.device)
        earlier = [self._indices[a] for a in range(layer) if a in self._indices]
        if len(earlier) != layer:
            raise RuntimeError(f"layer {layer} called before layers 0..{layer - 1} of this pass")
        prompt_min = self._prompt_min
        for t0 in range(0, n_tiles, tiles_per_chunk):
            t1 = min(n_tiles, t0 + tiles_per_chunk)
            lo, hi = t0 * T, min(L, t1 * T)
            s = torch.einsum("hgqd,hkd->hgqk", qf[:, :, lo:hi], kf) * scale
            s.masked_fill_(keys[None, :] > torch.arange(lo, hi, device=q.device)[:, None], -math.inf)
            p = torch.softmax(s, dim=-1)
            out[:, :, lo:hi] = torch.einsum("hgqk,hkd->hgqd", p, vf)
            s0 = max(t0, first_stat)
            if s0 >= t1:
                continue
            # Pool the stat tiles' rows over the GQA group and the tile: [Hkv, nt, L].
            rows = p[:, :, (s0 * T - lo):].sum(dim=1)
            tile_of_row = (torch.arange(s0 * T, hi, device=q.device) // T) - s0
            pooled = torch.zeros(Hkv, t1 - s0, L, dtype=torch.float32, device=q.device)
            pooled.index_add_(1, tile_of_row, rows)
            prefix = torch.arange(s0, t1, device=q.device) * T
            in_prefix = keys[None, :] < prefix[:, None]  # [nt, L]
            pooled = torch.where(in_prefix[None], pooled, 0.0)
            own_mass, own_idx = torch.topk(torch.where(in_prefix[None], pooled, -1.0), kk, dim=-1)
            den = own_mass.sum(-1).clamp_min(1e-30)  # [Hkv, nt]
            layer_idx[:, s0 - first_stat : t1 - first_stat] = own_idx
            # Every earlier-or-same layer a's sets against this layer's distribution: [a, h, g, nt].
            cand = torch.stack([e[:, s0 - first_stat : t1 - first_stat] for e in earlier] + [own_idx])
            A = cand.shape[0]
            src = pooled[None, :, None].expand(A, Hkv, Hkv, t1 - s0, L)
            idx = cand[:, None].expand(A, Hkv, Hkv, t1 - s0, kk)
            num = torch.gather(src, -1, idx).sum(-1)
            ratio = (num / den[None, :, None, :]).amin(-1).cpu()  # [A, h, g]
            prompt_min[:A, layer] = torch.minimum(prompt_min[:A, layer], ratio)
        self._indices[layer] = layer_idx
        return out.reshape(1, Hq, L, D).to(q.dtype)
