"""Reference math of the Kascade selection variants studied for closing the cross-layer reuse gap (issue 14).

Pure PyTorch, decode only (one query per row), float32, no kernels: these are definitions, used by the
eval methods in :mod:`kascade.baselines.kascade_variants`. The paper's method (:mod:`kascade.reference`)
is untouched; each variant changes only *which* keys an anchor selects and how many of them a layer
attends:

* sinks + recent window inside the budget (:func:`select_sinks_window`): the first S and last R valid
  keys of the row are always selected, the Top-k of the pooled scores fills the remaining k - S - R
  slots, so the row attends exactly the paper's k keys.
* per-layer budgets (:func:`layer_budgets`): a plan's ``layer_budget_scale`` turns the row budget k into
  one integer budget per layer whose mean over layers 1..L-1 is exactly k.
* re-ranking (:func:`rerank`): an anchor's Top-C candidates (C = a multiple of k), of which each reuse
  layer attends the k its own queries weigh most (it reads C keys, attends k).
* adaptive top-p (:func:`select_top_p`): the smallest set of keys holding a share p of the pooled mass,
  clamped between a floor and a cap (Twilight's top-p idea applied to Kascade's pooled scores).

Pooled scores (:func:`pooled_decode_probs`) are Kascade's decode pooling: each query head's full softmax
over the row's valid keys, summed over the heads of its GQA group, so a KV head's pooled mass is G.
Selections are absolute key positions, int32 [B, Hkv, kmax], -1 in unused slots, ordered by priority
(forced keys first, then by decreasing pooled score): a prefix of a selection is the selection of a
smaller budget.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .budget import topk_budget


def pooled_decode_probs(q: torch.Tensor, k: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor,
                        scale: float | None = None, power: float = 1.0) -> torch.Tensor:
    """[B, Hkv, Lk] float32: the sum over each GQA group of its query heads' softmax over the row's
    valid keys (q [B, Hq, 1, D], k [B, Hkv, Lk, D]); zero outside kv_start <= j < kv_end.

    ``power`` a != 1 pools sum_g p_g^a instead (the a-th power of the group's a-norm: the same ranking), a
    family from the paper's sum (a = 1) to the group's max (a = inf): larger a favours a key that one head
    weighs heavily over a key that all heads weigh a little."""
    B, Hq, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qg = q[:, :, 0].float().reshape(B, Hkv, Hq // Hkv, D)
    s = torch.einsum("bhgd,bhkd->bhgk", qg, k.float()) * scale
    keys = torch.arange(Lk, device=q.device)
    valid = (keys[None, :] >= kv_start[:, None]) & (keys[None, :] < kv_end[:, None])
    s = s.masked_fill(~valid[:, None, None, :], -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # an empty row (no valid key) pools nothing
    if power == 1.0:
        return p.sum(dim=2)
    return p.amax(dim=2) if math.isinf(power) else p.pow(power).sum(dim=2)


def _pack(rows: list[list[torch.Tensor]], B: int, H: int, device) -> torch.Tensor:
    """Per (row, head) 1-D index tensors -> int32 [B, H, kmax], -1 padded."""
    kmax = max([1] + [int(t.numel()) for r in rows for t in r])
    out = torch.full((B, H, kmax), -1, dtype=torch.int32, device=device)
    for b, r in enumerate(rows):
        for h, t in enumerate(r):
            out[b, h, : t.numel()] = t.to(torch.int32)
    return out


def topk_ordered(pooled: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor, counts) -> torch.Tensor:
    """The ``counts[b]`` valid keys of row b with the largest pooled score, per head, in decreasing score
    order: int32 [B, H, max(counts)], -1 padded (the paper's Top-k, ordered)."""
    B, H, _ = pooled.shape
    rows = []
    for b in range(B):
        s, e = int(kv_start[b]), int(kv_end[b])
        n = min(int(counts[b]), e - s)
        idx = torch.topk(pooled[b, :, s:e], n, dim=-1, sorted=True).indices + s
        rows.append([idx[h] for h in range(H)])
    return _pack(rows, B, H, pooled.device)


def hedge_with_shared(indices: torch.Tensor, shared: torch.Tensor, budgets, own: torch.Tensor) -> torch.Tensor:
    """Per (row b, head h): the first ``own[b]`` keys of ``indices[b, h]`` (a head's ordered set), then keys of
    ``shared[b, 0]`` (an ordered set for all heads) in its order, skipping those already taken, up to
    ``budgets[b]`` keys in all. int32 [B, H, max budget], -1 padded. Both inputs are -1 padded, ordered."""
    B, H, _ = indices.shape
    rows = []
    for b in range(B):
        kb, n_own = int(budgets[b]), min(int(own[b]), int(budgets[b]))
        pool = shared[b, 0][shared[b, 0] >= 0].long()
        row = []
        for h in range(H):
            head = indices[b, h][indices[b, h] >= 0].long()[:n_own]
            rest = pool[~torch.isin(pool, head)]
            row.append(torch.cat([head, rest])[:kb])
        rows.append(row)
    return _pack(rows, B, H, indices.device)


def select_sinks_window(pooled: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor, budgets,
                        sinks: int, window: int) -> torch.Tensor:
    """Exactly ``budgets[b]`` keys per (row, head): the first min(sinks, k) valid keys of the row, the last
    min(window, k - sinks') valid keys, and the Top-(k - sinks' - window') of the pooled scores among the
    other valid keys. int32 [B, H, max budget], -1 padded; forced keys first, then by decreasing score."""
    if sinks < 0 or window < 0:
        raise ValueError(f"sinks and window must be >= 0, got {sinks} and {window}")
    B, H, Lk = pooled.shape
    rows = []
    for b in range(B):
        s, e = int(kv_start[b]), int(kv_end[b])
        L = e - s
        kb = min(int(budgets[b]), L)
        n_sink = min(sinks, kb)
        n_win = min(window, kb - n_sink)
        forced = torch.zeros(L, dtype=torch.bool, device=pooled.device)
        forced[:n_sink] = True
        if n_win:
            forced[L - n_win:] = True
        n_forced = int(forced.sum())  # sinks and window may overlap in a short row
        forced_idx = torch.nonzero(forced).flatten()
        rest = pooled[b, :, s:e].masked_fill(forced[None, :], -math.inf)
        top = torch.topk(rest, kb - n_forced, dim=-1, sorted=True).indices
        rows.append([torch.cat([forced_idx, top[h]]) + s for h in range(H)])
    return _pack(rows, B, H, pooled.device)


def top_p_counts(pooled: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor, top_p: float,
                 k_min, k_max) -> torch.Tensor:
    """int64 [B, H]: per (row, head) the smallest n such that the n largest pooled scores hold a share
    ``top_p`` of the head's pooled mass over the row's valid keys, clamped to [k_min[b], k_max[b]] (and to
    the row's length)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    B, H, _ = pooled.shape
    counts = torch.zeros(B, H, dtype=torch.long)
    for b in range(B):
        s, e = int(kv_start[b]), int(kv_end[b])
        L = e - s
        x = pooled[b, :, s:e].double()
        c = torch.sort(x, dim=-1, descending=True).values.cumsum(-1)
        total = c[:, -1:] if L else c.new_zeros(H, 1)  # same summation order as the prefixes
        # n = 1 + number of prefixes still short of the target (smallest prefix reaching it)
        need = (c < top_p * total).sum(-1) + 1
        lo, hi = min(int(k_min[b]), L), min(int(k_max[b]), L)
        counts[b] = need.clamp(min=lo, max=max(lo, hi)).clamp(max=L).cpu()
    return counts


def select_top_p(pooled: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor, top_p: float,
                 k_min, k_max) -> tuple[torch.Tensor, torch.Tensor]:
    """The adaptive selection: per (row, head) the :func:`top_p_counts` keys of largest pooled score, in
    decreasing order. Returns (indices int32 [B, H, kmax] -1 padded, counts int64 [B, H])."""
    counts = top_p_counts(pooled, kv_start, kv_end, top_p, k_min, k_max)
    B, H, _ = pooled.shape
    rows = []
    for b in range(B):
        s, e = int(kv_start[b]), int(kv_end[b])
        order = torch.topk(pooled[b, :, s:e], int(counts[b].max()) if H else 0, dim=-1, sorted=True).indices + s
        rows.append([order[h, : int(counts[b, h])] for h in range(H)])
    return _pack(rows, B, H, pooled.device), counts


def rerank(q: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor, budgets, scale: float | None = None
           ) -> torch.Tensor:
    """Keep the ``budgets[b]`` candidates of each (row, KV head) that this layer's own queries weigh most.

    candidates: int32 [B, Hkv, C] absolute key positions, -1 padded (e.g. an anchor's mapped Top-C). Each
    query head's softmax is taken over its KV head's candidates only (the only keys the layer reads), summed
    over the GQA group, and the Top-k of that pooled score is kept. Returns int32 [B, Hkv, max k], -1 padded,
    in decreasing pooled score."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    rows = []
    for b in range(B):
        row = []
        for h in range(Hkv):
            cand = candidates[b, h]
            cand = cand[cand >= 0].long()
            qh = q[b, h * G:(h + 1) * G, 0].float()  # [G, D]
            p = torch.softmax(qh @ k[b, h, cand].float().T * scale, dim=-1).sum(0)  # [C]
            n = min(int(budgets[b]), cand.numel())
            row.append(cand[torch.topk(p, n, sorted=True).indices])
        rows.append(row)
    return _pack(rows, B, Hkv, q.device)


def layer_budgets(k: int, length: int, scales: Sequence[float]) -> list[int]:
    """Integer budgets per layer from a row budget ``k`` (k <= length) and a plan's ``layer_budget_scale``.

    Entry 0 (layer 0, dense) is k. Layers 1..L-1 get budgets proportional to their scales that sum to
    exactly (L-1) * k, each in [1, length]: layers whose share would pass ``length`` are capped there and
    their excess spread over the others in proportion to their scales; integer parts are rounded by the
    largest remainder (ties to the lower layer).
    """
    n = len(scales) - 1
    k = min(int(k), int(length))
    if n <= 0:
        return [k] * len(scales)
    total = n * k
    s = [float(x) for x in scales[1:]]
    capped: set[int] = set()
    while True:
        free = [j for j in range(n) if j not in capped]
        rem = total - length * len(capped)
        ssum = sum(s[j] for j in free)
        share = {j: rem * s[j] / ssum for j in free}
        over = [j for j in free if share[j] > length]
        if not over:
            break
        capped.update(over)
    out = [length if j in capped else int(math.floor(share[j])) for j in range(n)]
    short = total - sum(out)
    by_rem = sorted(free, key=lambda j: (-(share[j] - math.floor(share[j])), j))
    for j in by_rem[:short]:
        out[j] += 1
    # every layer attends at least one key: take them from the largest budgets
    for j in range(n):
        while out[j] < 1:
            donor = max(range(n), key=lambda i: (out[i], -i))
            out[donor] -= 1
            out[j] += 1
    return [k] + out


def layer_budget_table(budgets: torch.Tensor, length: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """int64 [L, B]: :func:`layer_budgets` of every row (row budgets ``budgets`` [B], lengths [B])."""
    cols = [layer_budgets(int(kb), int(n), scales) for kb, n in zip(budgets.tolist(), length.tolist())]
    return torch.tensor(cols, dtype=torch.long).T.reshape(len(scales), len(cols))


def scales_from_reuse(reuse_similarity: Sequence[float], *, power: float = 0.5, miss_floor: float = 0.05,
                      lo: float = 0.5, hi: float = 2.0) -> list[float]:
    """Per-layer budget scales from each layer's calibrated reuse similarity r_j (share of its own Top-k
    mass that its governing anchor's mapped set captures; 1 at anchors).

    The expected miss of layer j is taken as d_j = (1 - r_j) + ``miss_floor`` (the floor stands for the
    mass even a layer's own Top-k misses), and the scale as d_j ** ``power`` (``power`` 0.5: the optimum
    when a layer's missed mass falls like 1/k), normalised to mean 1 over layers 1..L-1 and clipped to
    [lo, hi] (re-normalised until both hold). Entry 0 is 1.0 (layer 0 is dense)."""
    if not lo <= 1.0 <= hi:
        raise ValueError(f"need lo <= 1 <= hi, got lo={lo}, hi={hi}")
    n = len(reuse_similarity)
    if n <= 1:
        return [1.0] * n
    raw = [((1.0 - min(1.0, max(0.0, float(r)))) + miss_floor) ** power for r in reuse_similarity[1:]]
    x = [v / (sum(raw) / len(raw)) for v in raw]
    for _ in range(200):  # clip, then move the mean back to 1 over the layers that can still move
        x = [min(hi, max(lo, v)) for v in x]
        err = sum(x) - len(x)
        if abs(err) < 1e-12:
            break
        free = [i for i, v in enumerate(x) if (v > lo if err > 0 else v < hi)]
        fsum = sum(x[i] for i in free)
        for i in free:
            x[i] -= err * x[i] / fsum
    x = [round(v, 6) for v in x]
    x[-1] = round(x[-1] + (len(x) - sum(x)), 6)  # exact mean 1 after rounding
    return [1.0] + x
