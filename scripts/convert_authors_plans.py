#!/usr/bin/env python3
"""Convert the Kascade authors' calibrated anchors and head maps into kascade plans.

The authors (github.com/microsoft/kascade, MIT) ship one head map per model in
``results/head_mappings/<model>_layers_<anchors joined by _>.npy``; the anchor layers are the file
name (the same ``--recompute_layers`` their evaluation scripts pass). The files of commit 76aea84 are
kept, with the authors' LICENSE, in scripts/data/microsoft-kascade/; from the repository root::

    python scripts/convert_authors_plans.py scripts/data/microsoft-kascade \
        --commit 76aea84d4216b538e001fab018cbc24894ce32c3 --out-dir src/kascade/plans

reproduces the shipped plans (a git checkout of microsoft/kascade works too; ``--commit`` then
defaults to its HEAD).

Their array is int32 ``[num_layers, num_kv_heads]``, written by ``StatsRunner._find_head_mappings``
(src/runners/stats_runner.py): row j, column h is the KV head of layer j's governing anchor (the
latest anchor at or before j) whose tile-pooled Top-k indices KV head h of layer j reuses, the argmax
over anchor heads of their similarity. ``KascadeStrategy`` reads it as
``topk_to_reuse[:, head_mapping[layer], ...]`` over KV heads and then repeats each KV head's indices
for its query group. That is exactly our ``Plan.head_map`` (per KV head, reuse head -> anchor head,
anchor rows the identity), so the conversion copies the integers unchanged: it is lossless. The script
checks the shape against the model's config and that anchor rows are the identity, and ``Plan``
validates the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from kascade.plan import ModelSpec, Plan, PlanError  # noqa: E402

SOURCE = "authors (microsoft/kascade)"
REPO = "https://github.com/microsoft/kascade"
MAP_DIR = "results/head_mappings"


@dataclass(frozen=True)
class AuthorsModel:
    name: str  # our plan name (src/kascade/plans/<name>.json)
    model_id: str  # Hugging Face id
    file_stem: str  # the authors' file name prefix (their model_name.split("/")[-1])
    spec: ModelSpec  # from the model's config.json
    config: str  # where the shape was checked
    anchors_used_in: str  # where the authors run Kascade with these anchors


# Shapes from each model's config.json (num_hidden_layers, num_attention_heads, num_key_value_heads,
# head_dim; model_type is the architecture), as published on the Hugging Face hub.
MODELS = (
    AuthorsModel(
        "llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", "Meta-Llama-3.1-8B-Instruct",
        ModelSpec("llama", 32, 32, 8, 128, name="llama-3.1-8b-instruct"),
        "config.json of meta-llama/Llama-3.1-8B-Instruct: model_type llama, num_hidden_layers 32, "
        "num_attention_heads 32, num_key_value_heads 8, hidden_size 4096 (head_dim 128); the authors load it "
        "as meta-llama/Meta-Llama-3.1-8B-Instruct, the same repository's earlier name",
        "the authors' README example (--recompute_layers 0 2 8 13 14); their LongBench script uses 6 anchors "
        "(0 2 4 8 13 16) whose head map is not published",
    ),
    AuthorsModel(
        "deepseek-r1-distill-llama-8b", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "DeepSeek-R1-Distill-Llama-8B",
        ModelSpec("llama", 32, 32, 8, 128, name="deepseek-r1-distill-llama-8b"),
        "config.json of deepseek-ai/DeepSeek-R1-Distill-Llama-8B: model_type llama, num_hidden_layers 32, "
        "num_attention_heads 32, num_key_value_heads 8, head_dim 128",
        "the authors' scripts/eval_aime.py (--recompute_layers 0 2 8 13 14)",
    ),
    AuthorsModel(
        "qwen3-8b", "Qwen/Qwen3-8B", "Qwen3-8B",
        ModelSpec("qwen3", 36, 32, 8, 128, name="qwen3-8b"),
        "config.json of Qwen/Qwen3-8B: model_type qwen3, num_hidden_layers 36, num_attention_heads 32, "
        "num_key_value_heads 8, head_dim 128",
        "the authors' scripts/eval_aime.py (--recompute_layers 0 2 7 14 23); their LongBench script uses 6 "
        "anchors (0 2 7 13 17 23) whose head map is not published",
    ),
)

# The authors' budget and tile (scripts/eval_aime.py, eval_lb.py: TOPK = 10 percent, --tile_size 32;
# KascadeStrategy: k = min(max(128, int(k/100 * L)), L)). Ours is the same budget up to rounding.
AUTHORS_SETTINGS = {
    "topk_percent": 10,
    "topk_min": 128,
    "tile_size": 32,
    "rolling_prefill": True,
    "differences": (
        "the authors compute k = min(max(128, floor(0.10 * L)), L) (kascade: ceil); their reference "
        "strategy subtracts tile_size from k for the tile's own diagonal, and their fp16 CUDA kernels "
        "(efficient_kascade) round k up to a multiple of 128; layer 0 attends densely in both"
    ),
}

MIT_NOTICE = "Copyright (c) Microsoft Corporation. Licensed under the MIT License"


def find_map(root: Path, model: AuthorsModel) -> tuple[Path, tuple[int, ...]]:
    """The authors' single head-map file for ``model`` and the anchors its name gives."""
    files = sorted((root / MAP_DIR).glob(f"{model.file_stem}_layers_*.npy"))
    if len(files) != 1:
        raise SystemExit(f"expected one {MAP_DIR}/{model.file_stem}_layers_*.npy under {root}, found "
                         f"{[f.name for f in files]}")
    match = re.fullmatch(rf"{re.escape(model.file_stem)}_layers_((?:\d+_)*\d+)\.npy", files[0].name)
    if not match:
        raise SystemExit(f"cannot read the anchor layers from {files[0].name}")
    return files[0], tuple(int(a) for a in match.group(1).split("_"))


def convert(root: Path, model: AuthorsModel, commit: str, command: str, digests: dict[str, str]) -> Plan:
    path, anchors = find_map(root, model)
    head_map = np.load(path, allow_pickle=False)
    spec = model.spec
    if head_map.ndim != 2 or not np.issubdtype(head_map.dtype, np.integer):
        raise PlanError(f"{path.name}: expected a 2-D integer array, got {head_map.dtype} {head_map.shape}")
    if head_map.shape != (spec.num_layers, spec.num_kv_heads):
        raise PlanError(f"{path.name}: shape {head_map.shape} does not fit {model.model_id} "
                        f"({spec.num_layers} layers x {spec.num_kv_heads} KV heads)")
    for a in anchors:
        if a < spec.num_layers and list(head_map[a]) != list(range(spec.num_kv_heads)):
            raise PlanError(f"{path.name}: anchor layer {a} row is not the identity: {list(head_map[a])}")
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    same = sorted(n for n, d in digests.items() if d == sha and n != model.name)
    notes = [
        "head map copied unchanged: the authors' array is per KV head, reuse head -> anchor head, "
        "like ours (lossless; see scripts/convert_authors_plans.py)",
        "the authors calibrate with `scripts/eval_script.py --strategies post_softmax_pooled_prefill_topk "
        "--tile_size 32 --run_type select_layers` over MuSiQue (their README); the exact calibration data "
        "and size for this file are not recorded in their repository",
    ]
    if same:
        notes.append(f"this file is byte-identical to the authors' file for {', '.join(same)} (same sha256); "
                     "their repository does not say whether both models were calibrated separately")
    provenance = {
        "source": SOURCE,
        "command": command,
        "method": "converted from the authors' calibrated head map and anchors (importance-weighted DP, "
                  "min over tiles, head remapping: their StatsRunner select_layers)",
        "source_repo": REPO,
        "source_commit": commit,
        "source_path": f"{MAP_DIR}/{path.name}",
        "source_url": f"{REPO}/blob/{commit}/{MAP_DIR}/{path.name}",
        "source_sha256": sha,
        "license": "MIT",
        "license_notice": f"{MIT_NOTICE} ({REPO}/blob/{commit}/LICENSE)",
        "anchors_from": f"the file name (the authors' convention: <model>_layers_<anchors>.npy); used in "
                        f"{model.anchors_used_in}",
        "model": model.name,
        "model_name": model.model_id,
        "model_config": model.config,
        "authors_settings": AUTHORS_SETTINGS,
        "notes": notes,
    }
    plan = Plan(model=spec, anchor_layers=anchors, head_map=head_map.tolist(), topk_fraction=0.10,
                topk_floor=128, tile_size=32, provenance=provenance)
    plan.check_model(spec)
    return plan


def source_commit(root: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"{root} is not a git checkout; pass --commit (the authors' commit it was taken from)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("authors_dir", type=Path, help=f"a checkout of {REPO} (holding {MAP_DIR}/)")
    parser.add_argument("--commit", help="the authors' commit (default: git rev-parse HEAD in authors_dir)")
    parser.add_argument("--out-dir", type=Path, default=Path("src/kascade/plans"))
    args = parser.parse_args(argv)
    commit = source_commit(args.authors_dir, args.commit)
    command = f"python scripts/convert_authors_plans.py {args.authors_dir} --commit {commit} --out-dir {args.out_dir}"
    digests = {m.name: hashlib.sha256(find_map(args.authors_dir, m)[0].read_bytes()).hexdigest() for m in MODELS}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        plan = convert(args.authors_dir, model, commit, command, digests)
        out = args.out_dir / f"{model.name}.json"
        plan.save(out)
        print(f"{out}: {model.model_id}, anchors {list(plan.anchor_layers)} of {plan.model.num_layers} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
