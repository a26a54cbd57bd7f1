"""Comparison methods behind the Engine's per-layer interface, selectable by name.

``make_method(name, plan, model_spec, topk_fraction, topk_floor)`` builds any of ``METHODS`` with one
budget (fraction + floor, :func:`kascade.reference.topk_budget`); ``kascade.enable(model, method)``
installs the result like an Engine. Methods whose ``decode_only`` is true run dense prefill, so a runner
may prefill once densely and share the cache between them.
"""

from __future__ import annotations

from ..plan import ModelSpec, Plan
from ..validation import KascadeInputError
from ._common import LayerMethod, scaled_layer
from .kascade_methods import KascadeMethod
from .kascade_variants import VARIANTS as _VARIANTS
from .kascade_variants import (KascadeAllAnchors, KascadeDenseTail, KascadeLayerBudget, KascadeRerank, KascadeSinksWindow, KascadeTopP,
                               KascadeTwoSets, KascadeVariant, parse_name)
from .methods import LessIsMore, OmniKV, Quest, StreamingLLM, TidalDecode

# name -> (Engine variant, sparse prefill) for the Engine-backed methods
_ENGINE_METHODS = {
    "dense": ("dense", True),
    "oracle": ("oracle", True),
    "kascade": ("kascade", True),
    "kascade_all_heads_pooled": ("all_heads_pooled", True),
    "kascade_no_remap": ("no_remap", True),
    "kascade_pre_softmax": ("pre_softmax", True),
    "kascade_decode_only": ("kascade", False),
}
_BASELINES = {
    "streamingllm": StreamingLLM,
    "quest": Quest,
    "omnikv": OmniKV,
    "lessismore": LessIsMore,
    "tidaldecode": TidalDecode,
}
METHODS: tuple[str, ...] = tuple(_ENGINE_METHODS) + tuple(_VARIANTS) + tuple(_BASELINES)
# What `kascade eval` runs when no --methods are given: the paper's method, its ablations and the baselines
# (the reuse-gap variants are studies: named explicitly; kascade_layer_budget needs a plan that has budgets).
DEFAULT_METHODS: tuple[str, ...] = tuple(_ENGINE_METHODS) + tuple(_BASELINES)
# Methods that need a calibrated plan (anchors + head map); the rest only need the model's shape.
NEEDS_PLAN = frozenset(n for n in (*_ENGINE_METHODS, *_VARIANTS) if n.startswith("kascade"))


def method_base(name: str) -> str:
    """The method a name selects: ``name`` without its ``:key=value,...`` options (variants only)."""
    return name.partition(":")[0]


def is_method(name: str) -> bool:
    """Whether ``name`` selects a method: one of ``METHODS``, or a Kascade variant with options."""
    return name in METHODS or (":" in name and method_base(name) in _VARIANTS)


def needs_plan(name: str) -> bool:
    """Whether method ``name`` (options allowed) needs a calibrated plan."""
    return method_base(name) in NEEDS_PLAN


def make_method(
    name: str,
    plan: Plan | None = None,
    model_spec: ModelSpec | None = None,
    topk_fraction: float = 0.10,
    topk_floor: int = 128,
    *,
    record_selection: bool = False,
    backend=None,
):
    """Build comparison method ``name`` (one of ``METHODS``) at budget (topk_fraction, topk_floor).

    Names of the variants of :mod:`.kascade_variants` may carry options (``kascade_top_p:p=0.95``).
    Kascade variants need ``plan`` (its budget is replaced by the one given here); the others need only
    ``model_spec`` (taken from ``plan`` when omitted).
    """
    if not is_method(name):
        raise KascadeInputError(f"unknown method {name!r}; expected one of {', '.join(METHODS)} (the Kascade "
                                f"variants {', '.join(_VARIANTS)} also take options: name:key=value,...)")
    if model_spec is None:
        if plan is None:
            raise KascadeInputError(f"method {name!r} needs a model_spec or a plan")
        model_spec = plan.model
    if plan is not None:
        plan.check_model(model_spec)
    base, options = parse_name(name)
    if base in _VARIANTS:
        if plan is None:
            raise KascadeInputError(f"method {name!r} needs a calibrated plan (anchor layers and head map)")
        return _VARIANTS[base](plan.with_budget(topk_fraction, topk_floor), name=name, backend=backend,
                               record_selection=record_selection, **options)
    if name in _ENGINE_METHODS:
        variant, sparse_prefill = _ENGINE_METHODS[name]
        if plan is None:
            if name in NEEDS_PLAN:
                raise KascadeInputError(f"method {name!r} needs a calibrated plan (anchor layers and head map)")
            plan = Plan.identity(model_spec)
        plan = plan.with_budget(topk_fraction, topk_floor)
        return KascadeMethod(plan, name=name, variant=variant, sparse_prefill=sparse_prefill,
                             backend=backend, record_selection=record_selection)
    return _BASELINES[name](model_spec, topk_fraction=topk_fraction, topk_floor=topk_floor,
                            record_selection=record_selection, backend=backend)


__all__ = ["METHODS", "DEFAULT_METHODS", "NEEDS_PLAN", "make_method", "method_base", "is_method", "needs_plan", "LayerMethod",
           "KascadeMethod", "KascadeVariant", "KascadeSinksWindow", "KascadeLayerBudget", "KascadeTopP", "KascadeTwoSets",
           "KascadeAllAnchors", "KascadeRerank", "KascadeDenseTail", "StreamingLLM", "Quest",
           "OmniKV", "LessIsMore", "TidalDecode", "scaled_layer"]
