"""Hugging Face transformers integration: Kascade as a registered attention implementation.

``enable(model, plan)`` registers an attention function and its mask function under the name
``"kascade"`` in transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` and switches the
model to it (no forward is patched). Every attention module then calls our function with its
``layer_idx``; the function turns HF's mask into per-row key ranges ``[kv_start, kv_end)`` and calls the
attention method (a :class:`kascade.Engine`, or any object with the same
``__call__(layer, q, k, v, kv_start, kv_end, *, scale)`` signature, e.g. a baseline method), layers in
order within each forward pass.

Why a mask function of our own: the sdpa mask is a [B, 1, Lq, Lk] boolean tensor (a gigabyte at 32K
prefill); ours returns a :class:`KascadeMask` holding only the two per-row bounds when the mask is
plain causal + left padding (the case of ``generate()`` with DynamicCache, batched left-padded
prompts and chunked prefill). Anything else (sliding windows, packed sequences, custom 4-D masks,
right padding, holes) gets the full boolean mask; the attention function accepts it only if it is
exactly causal + left padding and otherwise runs dense attention, with one warning.

Served: Llama, Qwen2, Qwen3 and Mistral families, transformers >= 4.57, eval mode, greedy and sampled
``generate()``. Falls back to dense (one warning per reason and model): ``output_attentions``,
training-mode dropout, sliding windows that cut a row's keys, hybrid sliding/full models, masks that
are not plain left padding. An unknown architecture is left untouched (dense) with a warning.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from ..engine import Engine, Variant
from ..plan import ModelSpec, Plan, PlanError

ATTENTION_NAME = "kascade"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


class KascadeFallbackWarning(UserWarning):
    """Kascade could not serve a forward pass and ran dense attention instead."""


class AttentionMethod(Protocol):
    """Anything enable() accepts besides a Plan: called once per layer, in order, per forward pass."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_start: torch.Tensor | None, kv_end: torch.Tensor | None, *,
                 scale: float | None = None) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------ model spec
def model_spec(model) -> ModelSpec:
    """The :class:`ModelSpec` (architecture, layers, heads, head dim, name) of a HF decoder."""
    config = getattr(model, "config", model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = int(config.num_attention_heads)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    name = getattr(model, "kascade_model_name", None) or getattr(config, "_name_or_path", "") or ""
    return ModelSpec(
        architecture=str(getattr(config, "model_type", "unknown")),
        num_layers=int(config.num_hidden_layers),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=int(head_dim),
        name=str(name),
    )


# ------------------------------------------------------------------------------------------ the mask
@dataclass(frozen=True)
class KascadeMask:
    """Causal attention over each row's keys [kv_start, kv_end), queries aligned to kv_end.

    kv_start, kv_end: int64 [B]. Built by :func:`kascade_mask` in place of the [B, 1, Lq, Lk] mask.
    """

    kv_start: torch.Tensor
    kv_end: torch.Tensor
    q_length: int
    kv_length: int

    # Enough of the tensor interface for the code between mask creation and attention: generate()
    # prepares masks ahead for compileable (static) caches and calls .contiguous(); the model then
    # hands the object back to the mask function as its "attention_mask" (see kascade_mask).
    ndim = 4

    @property
    def shape(self) -> torch.Size:
        return torch.Size((int(self.kv_start.shape[0]), 1, self.q_length, self.kv_length))

    @property
    def device(self) -> torch.device:
        return self.kv_start.device

    def dim(self) -> int:
        return 4

    def contiguous(self) -> "KascadeMask":
        return self

    def to(self, *args, **kwargs) -> "KascadeMask":
        device = kwargs.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
        if device is None:
            return self
        return KascadeMask(self.kv_start.to(device), self.kv_end.to(device), self.q_length, self.kv_length)

    def to_bool(self) -> torch.Tensor:
        """The equivalent [B, 1, Lq, Lk] boolean mask (True = attend); for dense fallbacks only."""
        return _bounds_to_bool(self.kv_start, self.kv_end, self.q_length, self.kv_length)


def _bounds_to_bool(kv_start, kv_end, q_length: int, kv_length: int) -> torch.Tensor:
    keys = torch.arange(kv_length, device=kv_start.device)
    qpos = kv_end[:, None] - q_length + torch.arange(q_length, device=kv_start.device)[None, :]
    mask = (keys[None, None, :] <= qpos[:, :, None]) & (keys[None, None, :] >= kv_start[:, None, None])
    return mask[:, None]


def _sdpa_mask_function():
    from transformers import masking_utils

    return masking_utils.sdpa_mask


@torch.compiler.disable
def kascade_mask(batch_size: int, *args, **kwargs):
    """Mask function registered as "kascade" (signature of transformers' ``sdpa_mask``, 4.57 and 5.x).

    Returns a :class:`KascadeMask` when the mask is plain causal + left padding, else the full boolean
    sdpa mask (never None, so sdpa's ambiguous ``is_causal`` shortcut is not needed).
    """
    from transformers import masking_utils

    params = _bind_mask_args(batch_size, args, kwargs)
    prepared = params.get("attention_mask")
    if isinstance(prepared, KascadeMask):  # made ahead by generate() for a static cache
        if (prepared.q_length, prepared.kv_length) == (params.get("q_length"), params.get("kv_length")):
            return prepared
        raise ValueError(f"a prepared Kascade mask for {prepared.q_length} queries x {prepared.kv_length} keys "
                         f"was given to a pass of {params.get('q_length')} x {params.get('kv_length')}")
    bounds = _plain_bounds(params, masking_utils.causal_mask_function)
    if bounds is not None:
        return bounds
    kwargs = dict(kwargs, allow_is_causal_skip=False)
    return _sdpa_mask_function()(batch_size, *args, **kwargs)


def _bind_mask_args(batch_size, args, kwargs) -> dict[str, Any]:
    sig = inspect.signature(_sdpa_mask_function())
    bound = sig.bind_partial(batch_size, *args, **kwargs).arguments
    p = dict(bound)
    p.update(bound.get("kwargs", {}))
    if "cache_position" in p and p.get("q_length") is None:  # transformers 4.5x signature
        cache_position = p["cache_position"]
        p["q_length"] = int(cache_position.shape[0])
        p["q_offset"] = int(cache_position[0]) if cache_position.numel() else 0
    p.setdefault("q_offset", 0)
    p.setdefault("kv_offset", 0)
    return p


def _plain_bounds(p: dict[str, Any], causal_fn: Callable) -> KascadeMask | None:
    """Per-row bounds when the requested mask is causal + left padding; None when it is anything else."""
    if p.get("mask_function", causal_fn) is not causal_fn or p.get("local_size") is not None:
        return None
    q_length, kv_length = p.get("q_length"), p.get("kv_length")
    q_offset, kv_offset = p.get("q_offset", 0), p.get("kv_offset", 0)
    if q_length is None or kv_length is None or isinstance(q_offset, torch.Tensor) and q_offset.numel() != 1:
        return None
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    if kv_offset != 0:
        return None
    end = q_offset + q_length  # absolute position after the last query = keys the last query sees
    if not q_length <= end <= kv_length:
        return None
    batch = int(p["batch_size"])
    device = p.get("device", "cpu")
    attention_mask = p.get("attention_mask")
    if attention_mask is None:
        kv_start = torch.zeros(batch, dtype=torch.long, device=device)
    else:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
            return None
        pm = attention_mask[:, :end].bool()
        if pm.shape[1] < end:  # HF pads a short 2-D mask with "masked": right padding, not ours
            return None
        # Left padding: each row is 0...0 1...1 over the keys the queries can see.
        if end > 1 and bool((pm[:, 1:].int() < pm[:, :-1].int()).any()):
            return None
        kv_start = (~pm).sum(dim=1).to(torch.long)
        kv_start = kv_start.to(device)
    kv_end = torch.full((batch,), end, dtype=torch.long, device=kv_start.device)
    return KascadeMask(kv_start=kv_start, kv_end=kv_end, q_length=int(q_length), kv_length=int(kv_length))


def _bounds_from_bool(mask: torch.Tensor, q_length: int, kv_length: int):
    """(kv_start, kv_end) if a [B, 1|H, Lq, Lk] boolean mask is exactly causal + left padding
    (rows of padding queries are ignored: their output is discarded), else None."""
    if mask.dim() != 4 or mask.shape[-2:] != (q_length, kv_length) or mask.shape[1] != 1:
        return None
    m = mask[:, 0]
    last = m[:, -1]  # the last query sees every valid key of its row
    if not bool(last.any(dim=-1).all()):
        return None
    keys = torch.arange(kv_length, device=m.device)
    kv_start = torch.where(last, keys, kv_length).min(dim=-1).values
    kv_end = torch.where(last, keys, -1).max(dim=-1).values + 1
    expected = _bounds_to_bool(kv_start, kv_end, q_length, kv_length)[:, 0]
    qpos = kv_end[:, None] - q_length + torch.arange(q_length, device=m.device)[None, :]
    real_query = (qpos >= kv_start[:, None])[:, :, None]
    if not bool(((m == expected) | ~real_query).all()):
        return None
    return kv_start, kv_end


# ------------------------------------------------------------------------------------------ state
@dataclass
class _State:
    method: Any
    spec: ModelSpec
    previous_implementation: str | None
    force_dense: str | None = None  # a reason every pass runs dense
    warned: set[str] = field(default_factory=set)
    model_name: str = ""
    shards: dict[tuple[int, int], Any] = field(default_factory=dict)  # (rank, tp size) -> per-rank Engine

    def warn_once(self, reason: str) -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(
                f"kascade: {reason}; this forward pass runs dense attention instead of Kascade "
                f"(model {self.model_name or self.spec.architecture}). Warned once per reason.",
                KascadeFallbackWarning, stacklevel=4,
            )


def _output_attentions_requested(kwargs: dict) -> bool:
    if kwargs.get("output_attentions"):
        return True
    try:  # transformers 5.x records attentions through a context variable, not a kwarg
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    try:
        collected = _active_collector.get()
    except LookupError:
        return False
    return isinstance(collected, dict) and "attentions" in collected


# ------------------------------------------------------------------------------------------ attention fn
# Never traced by torch.compile (kascade.Generator compiles the rest of a decode step): the attention keeps
# per-pass state (anchor indices) and launches its own kernels; under compile it is a graph break.
@torch.compiler.disable
def kascade_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function registered as "kascade". query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D]
    (not repeated). Returns (out [B, Lq, Hq, D], attention weights or None)."""
    state: _State | None = getattr(module, "_kascade_state", None)
    if state is None:
        raise RuntimeError(
            "this model's attention implementation is 'kascade' but kascade.enable() was not called on it "
            "(or kascade.disable() removed its state); call kascade.enable(model, plan)"
        )
    method = state.method
    if query.shape[1] != state.spec.num_heads or key.shape[1] != state.spec.num_kv_heads:
        method = _tp_method(state, module, query, key)  # head-sharded q/k/v: tensor parallelism
    q_length, kv_length = query.shape[2], key.shape[2]
    reason = state.force_dense
    cache_ref = getattr(module, "_kascade_cache", None)
    cache = cache_ref() if cache_ref is not None else None
    if reason is None and cache is not None and cache.owns(module.layer_idx, key) and not module.training:
        # kascade's own cache: the step's bounds are known, no mask to read (the fast path)
        if _output_attentions_requested(kwargs):
            reason = "output_attentions=True asks for attention weights, which sparse attention does not form"
        elif sliding_window is not None and cache.length > int(sliding_window):
            reason = f"a row is longer than the sliding window ({sliding_window} tokens)"
        else:
            out = _attend_with_cache(method, module.layer_idx, cache, query, key, value, attention_mask, scaling)
            return out.transpose(1, 2).contiguous(), None
    if reason is None and _output_attentions_requested(kwargs):
        reason = "output_attentions=True asks for attention weights, which sparse attention does not form"
    if reason is None and dropout and module.training:
        reason = "attention dropout is active (training mode)"
    if reason is None and kwargs.get("softcap") is not None:
        reason = "attention logit softcapping is not supported"
    bounds = None
    if reason is None:
        if isinstance(attention_mask, KascadeMask):
            bounds = attention_mask.kv_start, attention_mask.kv_end
        elif attention_mask is None:
            b = query.shape[0]
            bounds = (torch.zeros(b, dtype=torch.long, device=query.device),
                      torch.full((b,), kv_length, dtype=torch.long, device=query.device))
        elif isinstance(attention_mask, torch.Tensor):
            m = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            bounds = _bounds_from_bool(m, q_length, kv_length)
        window_cuts = sliding_window is not None and (
            kv_length > int(sliding_window) if bounds is None
            else int((bounds[1] - bounds[0]).max()) > int(sliding_window))
        if window_cuts:
            reason = f"a row is longer than the sliding window ({sliding_window} tokens)"
        elif bounds is None:
            reason = "the attention mask is not plain causal + left padding (custom, packed or right-padded)"
    if reason is not None:
        state.warn_once(reason)
        return _dense_fallback(module, query, key, value, attention_mask, scaling, kwargs)
    kv_start, kv_end = (t.to(device=query.device, dtype=torch.long) for t in bounds)
    out = method(module.layer_idx, query, key, value, kv_start, kv_end, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------------ tensor parallelism
def _tp_rank(module: torch.nn.Module, tp_size: int) -> int:
    """This process's TP rank for a module whose attention heads are split over ``tp_size`` ranks: the local
    rank on the sharded mesh dimension of its q_proj weight when that is a DTensor (transformers' TP), else
    the rank in the default process group when the group is exactly the TP group (world size == tp_size)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise PlanError("torch.distributed is not initialised")
    proj = getattr(module, "q_proj", None)
    weight = getattr(proj, "weight", None)
    mesh, placements = getattr(weight, "device_mesh", None), getattr(weight, "placements", None)
    if mesh is not None and placements is not None:
        from torch.distributed.tensor import Shard

        dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard) and pl.dim == 0]
        if len(dims) == 1 and mesh.size(dims[0]) == tp_size:
            return int(mesh.get_local_rank(dims[0]))
        raise PlanError(f"q_proj's weight is sharded as {placements} over a mesh of shape {tuple(mesh.shape)}, "
                        f"expected one dimension of {tp_size} ranks splitting the heads")
    world = dist.get_world_size()
    if world != tp_size:
        raise PlanError(f"the heads are split over {tp_size} ranks but the process group has {world}, and "
                        "q_proj's weight is no DTensor to read the TP mesh from")
    return int(dist.get_rank())


def _tp_method(state: _State, module, query: torch.Tensor, key: torch.Tensor):
    """The per-rank Engine (built once) when the attention receives a TP shard's heads: Hq/t query and Hkv/t
    KV heads of the model the plan was made for, heads rank*Hkv/t.. of the full model. PlanError where the
    head counts are no TP split, the rank cannot be learnt, or the plan's head map crosses shards."""
    spec = state.spec
    hq, hkv = query.shape[1], key.shape[1]
    t = spec.num_kv_heads // hkv if hkv and spec.num_kv_heads % hkv == 0 else 0
    if not t or hq * t != spec.num_heads or hkv * t != spec.num_kv_heads:
        raise PlanError(f"layer {module.layer_idx} got {hq} query heads and {hkv} KV heads; the plan's model has "
                        f"{spec.num_heads} and {spec.num_kv_heads} (not an even tensor-parallel split)")
    try:
        rank = _tp_rank(module, t)
    except PlanError as exc:
        raise PlanError(f"layer {module.layer_idx} got {hq} of {spec.num_heads} query heads and {hkv} of "
                        f"{spec.num_kv_heads} KV heads (tensor parallelism over {t} ranks?) but kascade cannot "
                        f"learn this process's shard: {exc}") from None
    engine = state.shards.get((rank, t))
    if engine is None:
        method = state.method
        if not isinstance(method, Engine):
            raise PlanError(f"under tensor parallelism (TP size {t}) kascade shards an Engine's plan; the attention "
                            f"method {type(method).__name__} gets the full model's heads only")
        engine = Engine(method.plan.shard(rank, t), variant=method.variant, sparse_prefill=method.sparse_prefill,
                        backend=method.backend, track_stats=method.track_stats)
        state.shards[(rank, t)] = engine
    return engine


def _attend_with_cache(method, layer: int, cache, query, key, value, attention_mask, scaling):
    """Attention of one layer over a KascadeCache: the step is the cache's; an Engine gets it once per
    pass (begin) and runs each layer without validation or host reads (run)."""
    step = cache.step
    if layer == 0 and not cache.padding_known and isinstance(attention_mask, KascadeMask) \
            and step.lengths is not None:
        # the first pass over an empty cache: left padding from generate()'s mask (one host read)
        cache.set_start(attention_mask.kv_start)
        step = cache.step = cache.step_for(step.q_length)
    if isinstance(method, Engine):
        if layer == 0:
            method.begin(step, query, key)
        return method.run(layer, query, key, value, scale=scaling)
    if step.kv_length is not None:
        key, value = key[:, :, : step.kv_length], value[:, :, : step.kv_length]
    return method(layer, query, key, value, step.kv_start, step.kv_end, scale=scaling)


def _dense_fallback(module, query, key, value, attention_mask, scaling, kwargs):
    q_length, kv_length = query.shape[2], key.shape[2]
    if isinstance(attention_mask, KascadeMask):
        mask = attention_mask.to_bool()
    elif attention_mask is None:
        mask = _bounds_to_bool(torch.zeros(query.shape[0], dtype=torch.long, device=query.device),
                               torch.full((query.shape[0],), kv_length, device=query.device),
                               q_length, kv_length)
    else:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if _output_attentions_requested(kwargs):
        scores = torch.matmul(query.float(), k.float().transpose(2, 3)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        out = torch.matmul(weights, v.float()).to(query.dtype)
        return out.transpose(1, 2).contiguous(), weights.to(query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    out = torch.nan_to_num(out, nan=0.0)  # padding queries that see no key
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------------ enable
_registered = False


def register() -> None:
    """Register the "kascade" attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, kascade_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, kascade_mask)
    _registered = True


def _attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]


def _sliding_layers(config) -> list[int]:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    return []


def enable(
    model,
    plan_or_method: Plan | AttentionMethod | str,
    *,
    variant: Variant = "kascade",
    sparse_prefill: bool = True,
    backend: str | None = None,
    track_stats: bool = False,
):
    """Switch ``model`` to Kascade attention. Returns the attention method in use (an :class:`Engine`
    when given a plan; read ``.stats`` from it with ``track_stats=True``).

    plan_or_method: a :class:`Plan` (or the path of a plan JSON), checked against the model (PlanError
    if it was made for another shape), or an attention method object (used as given; an object with a
    ``plan`` attribute has that plan checked). variant, sparse_prefill, backend and track_stats build
    the Engine and apply to plans only.
    """
    spec = model_spec(model)
    if isinstance(plan_or_method, str):
        plan_or_method = Plan.load(plan_or_method)
    if isinstance(plan_or_method, Plan):
        plan_or_method.check_model(spec)
        method = Engine(plan_or_method, variant=variant, sparse_prefill=sparse_prefill, backend=backend,
                        track_stats=track_stats)
    elif callable(plan_or_method):
        method = plan_or_method
        inner_plan = getattr(method, "plan", None)
        if isinstance(inner_plan, Plan):
            inner_plan.check_model(spec)
    else:
        raise PlanError(f"enable() takes a Plan, a plan path or an attention method, got {type(plan_or_method).__name__}")

    name = spec.name or spec.architecture
    if spec.architecture not in SUPPORTED_MODEL_TYPES:
        warnings.warn(
            f"kascade: architecture {spec.architecture!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}); the model keeps its dense attention",
            KascadeFallbackWarning, stacklevel=2,
        )
        return method
    modules = _attention_modules(model)
    layers = sorted(m.layer_idx for m in modules)
    if layers != list(range(spec.num_layers)):
        raise PlanError(f"found attention modules for layers {layers[:5]}..., expected 0..{spec.num_layers - 1}")

    register()
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous == ATTENTION_NAME:  # enabled twice: keep the original to restore
        previous = getattr(modules[0], "_kascade_state").previous_implementation
    state = _State(method=method, spec=spec, previous_implementation=previous, model_name=name)
    sliding = _sliding_layers(config)
    if sliding and len(sliding) < spec.num_layers:
        state.force_dense = (f"layers {sliding[:4]}{'...' if len(sliding) > 4 else ''} use sliding-window attention "
                             "in a hybrid model, which Kascade's cross-layer reuse cannot serve")
    for m in modules:
        m._kascade_state = state
    _set_implementation(model, ATTENTION_NAME)
    return method


def _set_implementation(model, name: str | None) -> None:
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(name)
            return
        except (ValueError, KeyError, TypeError):
            pass
    model.config._attn_implementation = name


def disable(model) -> None:
    """Restore the attention implementation the model had before :func:`enable`."""
    modules = _attention_modules(model)
    state = getattr(modules[0], "_kascade_state", None) if modules else None
    if state is None:
        return
    for m in modules:
        if hasattr(m, "_kascade_state"):
            del m._kascade_state
    _set_implementation(model, state.previous_implementation or "sdpa")


def attach_cache(model, cache) -> None:
    """Let the attention of ``model`` recognise ``cache`` (a KascadeCache) in the passes that use it."""
    import weakref

    ref = weakref.ref(cache)
    for m in _attention_modules(model):
        m._kascade_cache = ref


def method_of(model):
    """The attention method enabled on ``model``, or None."""
    modules = _attention_modules(model)
    state = getattr(modules[0], "_kascade_state", None) if modules else None
    return state.method if state else None


__all__ = ["enable", "disable", "model_spec", "method_of", "register", "kascade_attention_forward",
           "kascade_mask", "KascadeMask", "KascadeFallbackWarning", "AttentionMethod", "SUPPORTED_MODEL_TYPES"]
