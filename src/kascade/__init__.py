"""kascade: training-free sparse attention for long-context LLM inference (Kascade, arXiv 2512.16391).

Layer 0 and a few calibrated anchor layers compute exact Top-k keys of their pooled post-softmax
attention; every other layer reuses its anchor's keys through a per-layer head map.
"""

from .engine import VARIANTS, Engine, Variant
from .integrations import disable, enable
from .attention import anchor_attention, dense_attention, sparse_attention
from .plan import ModelSpec, Plan, PlanError
from .budget import topk_budget
from .validation import KascadeInputError

__version__ = "0.1.0"

_LAZY = {  # need transformers: imported on first use, so `import kascade` stays torch-only
    "Generator": ("kascade.generation", "Generator"),
    "generate": ("kascade.generation", "generate"),
    "warmup": ("kascade.generation", "warmup"),
    "KascadeCache": ("kascade.integrations.cache", "KascadeCache"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kascade' has no attribute {name!r}")

__all__ = [
    "Engine", "Variant", "VARIANTS", "ModelSpec", "Plan", "PlanError", "KascadeInputError",
    "anchor_attention", "dense_attention", "sparse_attention", "topk_budget", "enable", "disable",
    "Generator", "generate", "warmup", "KascadeCache",
]
