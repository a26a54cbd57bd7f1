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

Variants (the paper's objective is the default; the others are recorded in the same pass for studies):
``similarity`` is the minimum over tiles with k = ``stats_k``; ``variants["mean"]`` is the mean over the same
tiles; with ``budget=(fraction, floor)`` the collector also scores each tile's sets at the plan's own budget
k_t = min(max(ceil(fraction * prefix_t), floor), prefix_t) (``variants["budget_min"]``/``["budget_mean"]``,
over the tiles whose prefix exceeds both stats_k and k_t).

``variants["decode"]`` (with ``budget``) scores what decode does instead: each of the prompt's last
``decode_rows`` positions is one query, its probabilities pooled over the GQA group only (no tile), the sets
taken at the decode budget k_r = min(max(ceil(fraction * (r + 1)), floor), r + 1) of its r + 1 visible keys;
the ratio is averaged over the rows whose visible keys exceed k_r, then over prompts. The tile statistics
describe the rolling prefill, this one the single-query selections decode reuses (on Qwen2.5-0.5B they differ
most at layers 1-2, which reuse layer 0's sets; plans made from it decode no better there:
`results/eval_qwen_cpu_decode_objective/NOTES.md`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..plan import ModelSpec
from ..budget import topk_budget

# Scores of one chunk stay under ~16M floats (64 MB).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class CalibrationStats:
    """Everything the anchor search and head map need, aggregated over the development set.

    similarity: [L, L, H, H] float64, similarity[a, b, h, g] (defined for a <= b; 0 elsewhere), the mean
    over prompts of the per-prompt minimum over query tiles. importance: [L] float64 (w_j).
    variants: other aggregations of the same runs, by name ("min" = ``similarity``, "mean", "budget_min",
    "budget_mean"; see the module docstring); empty for statistics saved before they existed.
    """

    spec: ModelSpec
    similarity: torch.Tensor
    importance: torch.Tensor
    num_prompts: int
    num_tokens: int
    stats_k: int
    tile_size: int
    info: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, torch.Tensor] = field(default_factory=dict)

    def layer_similarity(self) -> torch.Tensor:
        """[L, L]: mean over reuse heads h of max over anchor heads g (head remapping), a <= b."""
        return self.similarity.amax(dim=3).mean(dim=2)

    def weighted_similarity(self, weighting: str = "importance") -> torch.Tensor:
        """[L, L]: S[a][j] * w_j, the objective of the anchor dynamic program (``weighting="uniform"``:
        w_j = 1, every layer counts the same)."""
        if weighting == "uniform":
            return self.layer_similarity()
        if weighting != "importance":
            raise ValueError(f"weighting={weighting!r}; expected 'importance' or 'uniform'")
        return self.layer_similarity() * self.importance[None, :]

    def variant(self, name: str = "min") -> "CalibrationStats":
        """These statistics with ``similarity`` replaced by variant ``name`` ("min" is the default one)."""
        from dataclasses import replace

        if name == "min":
            return self
        if name not in self.variants:
            have = ", ".join(["min", *sorted(self.variants)])
            raise ValueError(f"these statistics have no {name!r} variant (they have: {have}); collect them again")
        return replace(self, similarity=self.variants[name], info=dict(self.info, variant=name))

    def save(self, path: str | Path) -> None:
        from dataclasses import asdict

        torch.save({"spec": asdict(self.spec), "similarity": self.similarity, "importance": self.importance,
                    "num_prompts": self.num_prompts, "num_tokens": self.num_tokens, "stats_k": self.stats_k,
                    "tile_size": self.tile_size, "info": self.info, "variants": self.variants}, path)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationStats":
        d = torch.load(path, weights_only=True)
        d["spec"] = ModelSpec(**d["spec"])
        return cls(**d)


class StatsCollector:
    """An attention method (for ``kascade.enable``) that attends densely and records calibration statistics.

    Call ``begin_prompt()`` before and ``end_prompt()`` after each single-prompt forward pass.
    """

    def __init__(self, spec: ModelSpec, *, stats_k: int = 64, tile_size: int = 32,
                 budget: tuple[float, int] | None = None, decode_rows: int = 64) -> None:
        if decode_rows < 1:
            raise ValueError(f"decode_rows={decode_rows}; expected at least 1 query row")
        self.spec = spec
        self.stats_k = stats_k
        self.tile_size = tile_size
        self.budget = budget
        self.decode_rows = decode_rows
        L, H = spec.num_layers, spec.num_kv_heads
        self.sim_sum = torch.zeros(L, L, H, H, dtype=torch.float64)
        names = ["mean"] + (["budget_min", "budget_mean", "decode"] if budget is not None else [])
        self.variant_sums = {n: torch.zeros(L, L, H, H, dtype=torch.float64) for n in names}
        self.variant_prompts = {n: 0 for n in names}
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
        # Per prompt: sum over tiles of the ratio and the tile count per reuse layer, for "mean"; the
        # budget-k minimum and sum/count when collected.
        self._prompt_acc = {"sum": torch.zeros(L, L, H, H, dtype=torch.float64), "count": torch.zeros(L),
                            "bmin": torch.full((L, L, H, H), math.inf, dtype=torch.float32),
                            "bsum": torch.zeros(L, L, H, H, dtype=torch.float64), "bcount": torch.zeros(L),
                            "dsum": torch.zeros(L, L, H, H, dtype=torch.float64), "dcount": torch.zeros(L)}
        self._indices = {}
        self._decode_indices: dict[int, torch.Tensor] = {}
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
        acc, up4 = self._prompt_acc, upper[:, :, None, None]
        mean = acc["sum"] / acc["count"].clamp_min(1)[None, :, None, None]
        self.variant_sums["mean"] += torch.where(up4, mean, 0.0)
        self.variant_prompts["mean"] += 1
        if self.budget is not None and torch.isfinite(acc["bmin"][upper]).all():
            self.variant_sums["budget_min"] += torch.where(up4, acc["bmin"].double(), 0.0)
            bmean = acc["bsum"] / acc["bcount"].clamp_min(1)[None, :, None, None]
            self.variant_sums["budget_mean"] += torch.where(up4, bmean, 0.0)
            self.variant_prompts["budget_min"] += 1
            self.variant_prompts["budget_mean"] += 1
        if self.budget is not None and bool((acc["dcount"] > 0).all()):
            self.variant_sums["decode"] += torch.where(up4, acc["dsum"] / acc["dcount"][None, :, None, None], 0.0)
            self.variant_prompts["decode"] += 1
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
            num_tokens=self.num_tokens, stats_k=self.stats_k, tile_size=self.tile_size,
            info=dict(info or {}, budget=list(self.budget) if self.budget else None,
                      variant_prompts=dict(self.variant_prompts)),
            variants={n: t / self.variant_prompts[n] for n, t in self.variant_sums.items() if self.variant_prompts[n]},
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
        # Indices kept per tile: the stats_k set, or (budget variant) the largest per-tile budget; every
        # smaller set is a prefix of it (torch.topk returns them sorted by mass).
        K = kk
        if self.budget is not None and n_tiles > first_stat:
            K = max(kk, int(topk_budget((n_tiles - 1) * T, *self.budget)))
        layer_idx = torch.full((Hkv, max(0, n_tiles - first_stat), K), -1, dtype=torch.long, device=q.device)
        tiles_per_chunk = max(1, _CHUNK_ELEMENTS // (Hq * L * T))
        keys = torch.arange(L, device=q.device)
        earlier = [self._indices[a] for a in range(layer) if a in self._indices]
        if len(earlier) != layer:
            raise RuntimeError(f"layer {layer} called before layers 0..{layer - 1} of this pass")
        prompt_min, acc = self._prompt_min, self._prompt_acc
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
            own_mass, own_idx = torch.topk(torch.where(in_prefix[None], pooled, -1.0), K, dim=-1)
            den = own_mass[..., :kk].sum(-1).clamp_min(1e-30)  # [Hkv, nt]
            layer_idx[:, s0 - first_stat : t1 - first_stat] = own_idx
            # Every earlier-or-same layer a's sets against this layer's distribution: [a, h, g, nt].
            cand = torch.stack([e[:, s0 - first_stat : t1 - first_stat] for e in earlier] + [own_idx])
            A = cand.shape[0]
            src = pooled[None, :, None].expand(A, Hkv, Hkv, t1 - s0, L)
            idx = cand[:, None].expand(A, Hkv, Hkv, t1 - s0, K)
            got = torch.gather(src, -1, idx)  # [A, h, g, nt, K]
            ratio = got[..., :kk].sum(-1) / den[None, :, None, :]  # [A, h, g, nt]
            prompt_min[:A, layer] = torch.minimum(prompt_min[:A, layer], ratio.amin(-1).cpu())
            acc["sum"][:A, layer] += ratio.sum(-1).double().cpu()
            acc["count"][layer] += t1 - s0
            if self.budget is not None:
                kt = topk_budget(prefix, *self.budget)  # [nt]
                valid = prefix > kt
                if bool(valid.any()):
                    rank = (torch.arange(K, device=q.device)[None, :] < kt[:, None]).float()  # [nt, K]
                    bden = (own_mass.clamp_min(0) * rank).sum(-1).clamp_min(1e-30)  # [Hkv, nt]
                    bratio = (got * rank).sum(-1) / bden[None, :, None, :]
                    bmin = torch.where(valid, bratio, math.inf).amin(-1).cpu()
                    acc["bmin"][:A, layer] = torch.minimum(acc["bmin"][:A, layer], bmin)
                    acc["bsum"][:A, layer] += torch.where(valid, bratio, 0.0).sum(-1).double().cpu()
                    acc["bcount"][layer] += int(valid.sum())
        self._indices[layer] = layer_idx
        if self.budget is not None:
            self._decode_statistics(layer, qf, kf, scale)
        return out.reshape(1, Hq, L, D).to(q.dtype)

    def _decode_statistics(self, layer: int, qf: torch.Tensor, kf: torch.Tensor, scale: float) -> None:
        """The "decode" variant: the last decode_rows positions as single GQA-pooled queries at the decode
        budget (see the module docstring). qf [Hkv, G, L, D], kf [Hkv, L, D] in float32."""
        Hkv, G, L, _ = qf.shape
        dev = qf.device
        r0 = max(0, L - self.decode_rows)
        pos = torch.arange(r0, L, device=dev)
        kr = topk_budget(pos + 1, *self.budget)  # [R]
        K = int(kr.max())
        keys = torch.arange(L, device=dev)
        pooled = torch.empty(Hkv, L - r0, L, dtype=torch.float32, device=dev)
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // (Hkv * G * L))
        for c0 in range(r0, L, rows_per_chunk):
            c1 = min(L, c0 + rows_per_chunk)
            s = torch.einsum("hgqd,hkd->hgqk", qf[:, :, c0:c1], kf) * scale
            s.masked_fill_(keys[None, :] > torch.arange(c0, c1, device=dev)[:, None], -math.inf)
            pooled[:, c0 - r0 : c1 - r0] = torch.softmax(s, dim=-1).sum(dim=1)
        own_mass, own_idx = torch.topk(pooled, K, dim=-1)  # sorted: each row's k_r set is a prefix
        self._decode_indices[layer] = own_idx
        rank = (torch.arange(K, device=dev)[None, :] < kr[:, None]).float()  # [R, K]
        valid = (pos + 1 > kr).float()  # rows whose set is not every visible key
        n_valid = float(valid.sum())
        if n_valid == 0:
            return
        den = (own_mass * rank).sum(-1).clamp_min(1e-30)  # [Hkv, R]
        acc = self._prompt_acc
        for a in range(layer + 1):  # one earlier-or-same layer at a time bounds the gather's memory
            idx = self._decode_indices[a]  # [Hkv(g), R, K]
            got = torch.gather(pooled[:, None].expand(Hkv, Hkv, L - r0, L), -1,
                               idx[None].expand(Hkv, Hkv, L - r0, K))  # [h, g, R, K]
            ratio = (got * rank).sum(-1) / den[:, None, :]  # [h, g, R]
            acc["dsum"][a, layer] += ((ratio * valid).sum(-1) / n_valid).double().cpu()
        acc["dcount"][layer] += 1
