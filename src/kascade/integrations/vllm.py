"""Kascade inside vLLM: an attention backend, registered as vLLM's CUSTOM backend by a plugin.

    pip install kascade[vllm]
    KASCADE_PLAN=llama-3.1-8b-instruct python -c "from vllm import LLM; LLM(model=..., attention_backend='CUSTOM')"

The ``vllm.general_plugins`` entry point (``kascade = kascade.integrations.vllm:register``) registers
:class:`KascadeAttentionBackend` under ``AttentionBackendEnum.CUSTOM`` in every vLLM process; users pick it
with ``attention_backend="CUSTOM"``. The plan comes from ``KASCADE_PLAN`` (a shipped plan's name or a
plan JSON path) and is checked against the model's config (layers, heads, KV heads, head size) when the
first metadata builder is made: a plan for another model raises :class:`kascade.PlanError`.
``KASCADE_TOPK_FRACTION`` overrides the plan's budget (e.g. 1.0 to check against dense).

What runs where (vLLM's FlashAttention backend is the base: its paged cache layout
[num_blocks, 2, block_size, Hkv, D], its K/V cache writes, its metadata builder; one metadata object per
step is shared by all layers):

* pure decode batches (every query length 1): Kascade on the paged cache
  (:mod:`kascade.ops.paged`): layer 0 dense + selection, anchor layers select, every other layer
  reuses its anchor's indices through the plan's head map (read inside the kernel). The layer index
  comes from the layer's name (``model.layers.<i>.self_attn.attn``). These batches are captured in vLLM's
  full CUDA graphs (``UNIFORM_SINGLE_TOKEN_DECODE``): the indices an anchor returns are the buffers the
  reuse layers read in the same graph.
* prefill and mixed batches: vLLM's FlashAttention (dense; FA3 on Hopper): Kascade runs as
  "decode-only" there (the paged rolling prefill is not wired in yet).
* anything Kascade cannot serve (sliding windows, ALiBi, soft-capping, sinks, quantized KV caches,
  encoder attention, tensor parallelism) falls back to vLLM's FlashAttention, with one warning per reason.
"""

from __future__ import annotations

import os
import re
import warnings

import torch

from ..plan import Plan, PlanError

PLAN_ENV = "KASCADE_PLAN"
FRACTION_ENV = "KASCADE_TOPK_FRACTION"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(layer_name: str) -> int:
    """The decoder layer index in a vLLM attention layer's name, e.g. 'model.layers.12.self_attn.attn'."""
    m = _LAYER_RE.search(layer_name)
    if m is None:
        raise PlanError(f"cannot find the layer index in the attention layer name {layer_name!r} "
                        "(expected '...layers.<i>....')")
    return int(m.group(1))


def load_plan(value: str | None = None) -> Plan:
    """The plan named by ``KASCADE_PLAN`` (a shipped plan name or a JSON path), with the budget of
    ``KASCADE_TOPK_FRACTION`` if set."""
    from ..plans import load_shipped, shipped

    value = value if value is not None else os.environ.get(PLAN_ENV)
    if not value:
        raise PlanError(f"set {PLAN_ENV} to a plan JSON path or a shipped plan name ({', '.join(shipped())}) "
                        "to serve with the Kascade backend")
    plan = load_shipped(value) if value in shipped() else Plan.load(value)
    fraction = os.environ.get(FRACTION_ENV)
    return plan.with_budget(topk_fraction=float(fraction)) if fraction else plan


def check_plan(plan: Plan, *, num_layers: int, num_heads: int, num_kv_heads: int, head_size: int) -> None:
    """Refuse a plan made for another model shape (the model as vLLM runs it, one shard per GPU)."""
    m = plan.model
    want = (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim)
    got = (num_layers, num_heads, num_kv_heads, head_size)
    if want != got:
        raise PlanError(f"the plan was made for {m.num_layers} layers, {m.num_heads} heads, {m.num_kv_heads} KV "
                        f"heads, head size {m.head_dim}; vLLM runs {num_layers} layers, {num_heads} heads, "
                        f"{num_kv_heads} KV heads, head size {head_size} (tensor parallelism shards heads: "
                        "not supported yet)")


class _State:
    """Per process: the plan, its head maps on the device, and the indices of the latest anchor layer of
    the current step (kept between the layers of one forward pass)."""

    plan: Plan | None = None
    head_maps: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    indices_layer: int = -1
    warned: set = set()

    @classmethod
    def warn_once(cls, reason: str) -> None:
        if reason not in cls.warned:
            cls.warned.add(reason)
            warnings.warn(f"kascade (vLLM): {reason}; those layers run vLLM's FlashAttention", stacklevel=3)


def register() -> None:
    """vLLM plugin entry point: register the Kascade backend as AttentionBackendEnum.CUSTOM."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.KascadeAttentionBackend")


try:  # the classes exist only where vLLM is installed
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )
except ImportError:  # pragma: no cover - exercised where vLLM is absent (CI)
    FlashAttentionBackend = None

if FlashAttentionBackend is not None:

    class KascadeMetadataBuilder(FlashAttentionMetadataBuilder):
        """vLLM's FlashAttention metadata, plus: the plan is loaded and checked once (first builder)."""

        # full CUDA graphs for pure decode batches (Kascade's path); mixed batches run piecewise
        _cudagraph_support = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            if _State.plan is None:
                plan = load_plan()
                mc, pc = vllm_config.model_config, vllm_config.parallel_config
                check_plan(plan, num_layers=mc.get_num_layers(pc), num_heads=mc.get_num_attention_heads(pc),
                           num_kv_heads=mc.get_num_kv_heads(pc), head_size=mc.get_head_size())
                _State.plan = plan
                _State.head_maps = torch.tensor(plan.head_map, dtype=torch.int32, device=device)

    class KascadeAttentionImpl(FlashAttentionImpl):
        """Kascade on pure decode batches; vLLM's FlashAttention elsewhere (see the module docstring)."""

        _layer: int | None = None  # the decoder layer index, from the layer's name (first call)
        _reason: str | None = None  # why this layer cannot run Kascade ("" = it can)

        def _fallback_reason(self) -> str:
            if tuple(self.sliding_window) != (-1, -1):
                return "sliding-window layers"
            if self.alibi_slopes is not None:
                return "ALiBi"
            if self.logits_soft_cap:
                return "logit soft-capping"
            if getattr(self, "sinks", None) is not None:
                return "attention sinks"
            if str(self.kv_cache_dtype) not in ("auto", "bfloat16", "float16", "half", "float32"):
                return f"quantized KV caches ({self.kv_cache_dtype})"
            if getattr(self.attn_type, "value", self.attn_type) != "decoder":
                return "encoder attention"
            if _State.plan is not None and self.num_kv_heads != _State.plan.model.num_kv_heads:
                return "tensor parallelism (a shard holds part of the KV heads)"
            return ""

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            plan = _State.plan
            if (attn_metadata is None or plan is None or attn_metadata.max_query_len != 1
                    or output_scale is not None or output_block_scale is not None):
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                       output_block_scale)
            if self._reason is None:
                self._reason = self._fallback_reason()
                self._layer = layer_index(layer.layer_name)
            if self._reason:
                _State.warn_once(self._reason)
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                       output_block_scale)
            from ..ops import paged

            idx = self._layer
            n = attn_metadata.query_start_loc.shape[0] - 1  # sequences = queries in a decode batch
            q = query[:n]
            k_cache, v_cache = kv_cache.unbind(1)
            seq_lens = attn_metadata.seq_lens[:n]
            block_table = attn_metadata.block_table[:n]
            budget = dict(topk_fraction=plan.topk_fraction, topk_floor=plan.topk_floor)
            if plan.is_anchor(idx):
                out, indices = paged.paged_decode_anchor(q, k_cache, v_cache, block_table, seq_lens, scale=self.scale,
                                                         dense_output=idx == 0, **budget)
                _State.indices, _State.indices_layer = indices, idx
            else:
                anchor = plan.anchor_of(idx)
                if _State.indices_layer != anchor or _State.indices is None or _State.indices.shape[0] != n:
                    raise PlanError(f"layer {idx} reuses anchor layer {anchor}, whose indices this step does not "
                                    f"hold (held: layer {_State.indices_layer}); layers must run in order")
                out = paged.paged_decode_sparse(q, k_cache, v_cache, block_table, seq_lens, _State.indices,
                                                head_map=_State.head_maps[idx], scale=self.scale,
                                                budget=(plan.topk_fraction, plan.topk_floor))
            output[:n].copy_(out.view(output[:n].shape))
            return output

    class KascadeAttentionBackend(FlashAttentionBackend):
        """vLLM's FlashAttention backend (FA3 on Hopper) with Kascade's decode (registered as CUSTOM)."""

        @staticmethod
        def get_name() -> str:
            return "CUSTOM"

        @staticmethod
        def get_impl_cls():
            return KascadeAttentionImpl

        @staticmethod
        def get_builder_cls():
            return KascadeMetadataBuilder


__all__ = ["register", "load_plan", "check_plan", "layer_index", "PLAN_ENV", "FRACTION_ENV"]
