"""Anchor selection (exact dynamic program) and head-map derivation from calibration statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AnchorChoice:
    anchor_layers: tuple[int, ...]
    score: float  # sum over layers j of score[anchor(j)][j]
    max_score: float  # the score with every layer an anchor (sum of the diagonal)

    @property
    def relative(self) -> float:
        return self.score / self.max_score if self.max_score else 0.0


def _segment_scores(score: torch.Tensor) -> torch.Tensor:
    """seg[a, e] = sum_{j=a}^{e-1} score[a, j] for a < e <= L (layers a..e-1 governed by anchor a)."""
    L = score.shape[0]
    upper = torch.triu(score.double())
    cums = torch.cumsum(upper, dim=1)  # cums[a, e-1] = sum_{j<=e-1} score[a, j] over j >= a
    seg = torch.full((L, L + 1), float("-inf"), dtype=torch.float64)
    for a in range(L):
        seg[a, a + 1:] = cums[a, a:]
    return seg


def best_anchors(score: torch.Tensor, num_anchors: int) -> AnchorChoice:
    """The anchor set of size ``num_anchors`` (layer 0 included) maximising
    sum_j score[anchor(j)][j], anchor(j) the closest anchor at or before j. Exact, O(M L^2).

    score: [L, L], score[a][j] read only for a <= j.
    """
    L = score.shape[0]
    if score.shape != (L, L):
        raise ValueError(f"score must be square [L, L], got {tuple(score.shape)}")
    if not 1 <= num_anchors <= L:
        raise ValueError(f"num_anchors={num_anchors} must be in 1..{L} (the model has {L} layers)")
    seg = _segment_scores(score)
    M = num_anchors
    # best[m, e]: layers 0..e-1 covered by m segments (first anchored at 0); arg[m, e]: last anchor.
    best = torch.full((M + 1, L + 1), float("-inf"), dtype=torch.float64)
    arg = torch.full((M + 1, L + 1), -1, dtype=torch.long)
    best[1, 1:] = seg[0, 1:]
    arg[1, 1:] = 0
    for m in range(2, M + 1):
        for e in range(m, L + 1):
            # last segment starts at a (m-1 <= a <= e-1), covering a..e-1
            cand = best[m - 1, m - 1:e] + seg[m - 1:e, e]
            i = int(torch.argmax(cand))
            best[m, e], arg[m, e] = cand[i], m - 1 + i
    anchors, e = [], L
    for m in range(M, 0, -1):
        a = int(arg[m, e])
        anchors.append(a)
        e = a
    anchors.reverse()
    return AnchorChoice(tuple(anchors), float(best[M, L]), float(torch.diagonal(score.double()).sum()))


def anchor_table(score: torch.Tensor, sizes=range(3, 9)) -> list[AnchorChoice]:
    """The best anchor set for each number of anchors in ``sizes`` (those that fit the model)."""
    return [best_anchors(score, m) for m in sizes if m <= score.shape[0]]


def fewest_anchors(score: torch.Tensor, quality_target: float) -> AnchorChoice:
    """The best set with the fewest anchors (at least 2: layer 0 and one anchor) whose relative score
    (score / score with every layer an anchor) reaches ``quality_target``. The relative score of the best
    set only grows with the number of anchors, and is 1 with every layer an anchor, so one exists."""
    if not 0.0 < quality_target <= 1.0:
        raise ValueError(f"quality_target={quality_target} must be in (0, 1]: a share of the all-anchor score")
    L = score.shape[0]
    for m in range(min(2, L), L + 1):
        choice = best_anchors(score, m)
        if choice.relative >= quality_target - 1e-12:
            return choice
    return best_anchors(score, L)


def shard_tp_size(num_kv_heads: int, tp_sizes) -> int:
    """The TP size whose shards satisfy every size in ``tp_sizes``: their least common multiple (the largest
    when the others divide it). A head map valid for it is valid for each of them. ValueError if it does
    not divide ``num_kv_heads``."""
    import math

    sizes = [int(t) for t in tp_sizes]
    if not sizes or any(t < 1 for t in sizes):
        raise ValueError(f"TP sizes must be positive integers, got {sizes}")
    t = math.lcm(*sizes)
    if num_kv_heads % t:
        raise ValueError(f"TP sizes {sizes} need shards of {num_kv_heads} KV heads over {t} ranks, but {t} does not "
                         f"divide {num_kv_heads}")
    return t


def same_shard(num_kv_heads: int, tp_size: int) -> torch.Tensor:
    """[H, H] bool: True where reuse head h and anchor head g are on the same shard under TP size ``tp_size``."""
    shard = torch.arange(num_kv_heads) // (num_kv_heads // tp_size)
    return shard[:, None] == shard[None, :]


def head_map(similarity: torch.Tensor, anchor_layers, tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
    """head_map[j][h] = argmax_g similarity[anchor(j), j, h, g] for reuse layers; identity for anchors.

    similarity: [L, L, H, H] as in :class:`~kascade.calibrate.stats.CalibrationStats`. ``tp_size`` > 1: g only
    ranges over the anchor heads of h's own shard (shard of head h = h // (H / tp_size)), so the map is valid
    for that TP size and every size dividing it.
    """
    L, _, H, _ = similarity.shape
    allowed = same_shard(H, shard_tp_size(H, [tp_size])).to(similarity.device) if tp_size > 1 else None
    anchors = sorted(anchor_layers)
    rows = []
    for j in range(L):
        if j in anchors:
            rows.append(tuple(range(H)))
            continue
        a = max(x for x in anchors if x <= j)
        sim = similarity[a, j]
        if allowed is not None:
            sim = sim.masked_fill(~allowed, float("-inf"))
        rows.append(tuple(int(g) for g in sim.argmax(dim=-1)))
    return tuple(rows)
