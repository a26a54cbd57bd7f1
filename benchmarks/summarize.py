"""Print the README's speed tables (markdown) from the committed benchmark JSON.

    python benchmarks/summarize.py            # reads benchmarks/results/{decode_b64,decode_b1,prefill_final_*}.json
    python benchmarks/summarize.py --plot     # also redraws benchmarks/results/prefill_final.png from it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _points(name: str) -> list[dict]:
    data = json.loads((RESULTS / f"{name}.json").read_text())
    return data.get("rows") or data.get("points") or []


def _row(p: dict) -> str:
    r = p["ratio_to_dense"]
    return (f"| {p['context'] // 1024}K | {p['batch']} | {p['heads']}/{p['kv_heads']}/{p['head_dim']} | "
            f"{p['topk_fraction']:.0%} | {p['best_dense']} {p['best_dense_ms']:.3f} | "
            f"{p['model_layer_ms']:.3f} | **{p['model_speedup']:.2f}x** | {r['layer0']:.2f} | {r['anchor']:.2f} | "
            f"{r['reuse']:.3f} |")


HEADER = ("| context | batch | heads q/kv/dim | Top-k | best dense (ms) | Kascade per layer (ms) | speedup | "
          "layer-0 / dense | anchor / dense | reuse / dense |\n|---|---|---|---|---|---|---|---|---|---|")


PREFILL_FINAL = ("prefill_final_main", "prefill_final_256k", "prefill_final_fractions", "prefill_final_qwen",
                 "prefill_final_tiles")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot", action="store_true", help="redraw benchmarks/results/prefill_final.png")
    args = ap.parse_args()
    print("Decode (bf16, 32 layers with 5 anchors incl. layer 0):\n")
    print(HEADER)
    for name in ("decode_b64", "decode_b1"):
        for p in sorted(_points(name), key=lambda p: (-p["heads"], p["topk_fraction"], p["context"])):
            print(_row(p))
    print("\nPrefill (bf16, batch 1, tile 32 unless noted, 32 layers with 5 anchors incl. layer 0):\n")
    print(HEADER)
    for name in ("prefill_final_main", "prefill_final_256k", "prefill_final_fractions", "prefill_final_qwen"):
        for p in _points(name):
            print(_row(p))
    print("\nPrefill tile sizes:\n")
    print("| context | tile | speedup | reuse / dense | anchor / dense |\n|---|---|---|---|---|")
    for p in _points("prefill_final_tiles"):
        r = p["ratio_to_dense"]
        print(f"| {p['context'] // 1024}K | {p['tile_size']} | {p['model_speedup']:.2f}x | {r['reuse']:.3f} | "
              f"{r['anchor']:.2f} |")
    if args.plot:
        from kascade.bench.prefill import plot_speedup

        # the plot groups points by (Top-k, tile, geometry) and draws speedup against context
        plot_speedup([p for name in PREFILL_FINAL for p in _points(name)], str(RESULTS / "prefill_final.png"))
        print(f"\nwrote {RESULTS / 'prefill_final.png'}")


if __name__ == "__main__":
    main()
