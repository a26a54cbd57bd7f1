"""kascade: training-free sparse attention for long-context LLM inference (Kascade, arXiv 2512.16391).

Layer 0 and a few calibrated anchor layers compute exact Top-k keys of their pooled post-softmax
attention; every other layer reuses its anchor's keys through a per-layer head map.
"""

from .engine import VARIANTS, Engine, Variant
from .integrations import disable, enable
from .ops import anchor_attention, dense_attention, sparse_attention
from .plan import ModelSpec, Plan, PlanError
from .reference import topk_budget
from .validation import KascadeInputError

__version__ = "0.1.0"

__all__ = [
    "Engine", "Variant", "VARIANTS", "ModelSpec", "Plan", "PlanError", "KascadeInputError",
    "anchor_attention", "dense_attention", "sparse_attention", "topk_budget", "enable", "disable",
]
