"""Where does Kascade lose accuracy on a model: reuse across layers, or Top-k itself?

On the demo's needle prompt it (1) answers with the shipped plan and with a plan where every layer is
its own anchor (no reuse), sparse prefill included, and (2) prints, per layer, the attention mass the
last 256 prompt tokens keep with the layer's own tile-pooled Top-k, with the previous layer's indices
(identity head map), and with the plan's anchor through its head map.

    python scripts/diagnose_reuse.py [--model smollm2-135m] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from kascade import Plan, attention, enable
from kascade import reference as R
from kascade.demo import _decode, _prefill, build_prompt
from kascade.integrations import hf
from kascade.models import load
from kascade.plans import load_shipped


class _Recorder:
    """A dense attention method that keeps each layer's last queries and all keys."""

    def __init__(self, last: int) -> None:
        self.last, self.captured = last, {}

    def __call__(self, layer, q, k, v, kv_start=None, kv_end=None, *, scale=None):
        self.captured[layer] = (q[:, :, -self.last:].clone(), k.clone(), scale)
        return attention.dense_attention(q, k, v, kv_start, kv_end, scale=scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, tok = load(args.model)
    plan = load_shipped(args.model)
    ids, answer, _ = build_prompt(tok, 4000, 0.5, args.seed)
    print(f"{args.model}: {ids.shape[1]} tokens, expected answer {answer}")
    for name, p in (("shipped plan", plan),
                    ("every layer an anchor", Plan.identity(plan.model, tuple(range(plan.model.num_layers))))):
        enable(model, p)
        logits, cache, _ = _prefill(model, ids)
        text, _ = _decode(model, tok, logits, cache, 8)
        hf.disable(model)
        print(f"  {name:24s} anchors {list(p.anchor_layers)[:8]}{'...' if len(p.anchor_layers) > 8 else ''}: "
              f"{text!r} [{'correct' if answer in text else 'WRONG'}]", flush=True)

    rec = _Recorder(256)
    enable(model, rec)
    _prefill(model, ids)
    hf.disable(model)
    budget = dict(topk_fraction=plan.topk_fraction, topk_floor=plan.topk_floor, tile_size=plan.tile_size)
    own = {j: R.select_prefill(q, k, scale=s, **budget) for j, (q, k, s) in rec.captured.items()}

    def mass(j, idx):
        q, k, s = rec.captured[j]
        return float(R.selection_stats(q, k, idx, scale=s, **budget)[0].mean())

    print("\nattention mass kept by the last 256 prompt tokens")
    print("layer  own Top-k  previous layer's  plan anchor (head-mapped)")
    for j in range(1, plan.model.num_layers):
        a = plan.anchor_of(j)
        mapped = own[a].index_select(1, torch.tensor(plan.head_map[j]))
        print(f"{j:5d}  {mass(j, own[j]):9.3f}  {mass(j, own[j - 1]):16.3f}  {mass(j, mapped):8.3f} (layer {a})",
              flush=True)


if __name__ == "__main__":
    main()
