"""A KV cache that Kascade owns: preallocated, written in place, usable from ``generate()``.

transformers' DynamicCache concatenates every layer's keys and values at every step (34% of a 64K decode
step's GPU time, measured), and its StaticCache hides the current length in a device tensor that the
attention must read back. :class:`KascadeCache` is a transformers ``Cache`` whose layers write into
buffers of a fixed capacity ``[B, Hkv, capacity, D]`` and whose row bounds live in two persistent device
tensors (``kv_start``, ``kv_end``) mirrored on the host. Each forward pass is one *step*: the first
layer's ``update`` advances the bounds once, and the attention of every layer gets the same
:class:`kascade.engine.Step` (row bounds on the device, lengths on the host) with no host read.

Rows share their end (the transformers convention: shorter prompts are left-padded); ``kv_start[b]`` is
row b's number of padding tokens, set once from the attention mask (:meth:`KascadeCache.set_padding`).

The device tensors never move or change shape, so a decode step can be captured in a CUDA graph
(:mod:`kascade.generation`, with ``static_shapes=True``: every pass then sees the whole capacity and
the attention bounds it by ``kv_end``): the captured step adds q_length to ``kv_end`` on the device and
writes at ``kv_end - q_length``; the host mirror is advanced by whoever replays it (:meth:`advance_host`).
Otherwise a pass sees a view of the keys written so far, like any transformers cache.

Works with any attention implementation (sdpa sees an ordinary static-shape cache and a mask over its
capacity); with Kascade enabled the attention uses the step directly.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..engine import Step
from ..validation import KascadeInputError


class _Layer(CacheLayerMixin):
    """One layer's K/V buffers, views into the cache's [num_layers, B, Hkv, capacity, D] storage."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: "KascadeCache", index: int) -> None:
        super().__init__()
        self._cache = weakref.proxy(cache)
        self.index = index
        self.keys = cache.key_storage[index]
        self.values = cache.value_storage[index]
        self.dtype, self.device = self.keys.dtype, self.keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # preallocated
        return None

    @torch.compiler.disable  # host state (the length mirror): a graph break under torch.compile
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._cache._write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self._cache.length

    def get_max_length(self) -> int:
        return self._cache.capacity

    def reset(self) -> None:
        self._cache.reset()

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("KascadeCache does not support beam search (reorder_cache)")


class KascadeCache(Cache):
    """Preallocated KV cache for a batch of ``batch_size`` rows and ``capacity`` tokens per row.

    ``KascadeCache(model, batch_size, capacity)`` sizes itself from the model's config (layers, KV heads,
    head dim) and takes the model's dtype and device unless given. Pass it to ``generate()`` as
    ``past_key_values`` (transformers < 5.40) or ``cache``; it holds one sequence batch: call
    :meth:`reset` before reusing it for new prompts.
    """

    is_compileable = False

    def __init__(self, model, batch_size: int, capacity: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        from .hf import model_spec

        spec = model_spec(model)
        if int(batch_size) < 1 or int(capacity) < 1:
            raise KascadeInputError(f"batch_size and capacity must be positive, got {batch_size}, {capacity}")
        param = next(model.parameters()) if hasattr(model, "parameters") else None
        dtype = dtype or (param.dtype if param is not None else torch.float32)
        device = torch.device(device) if device is not None else (param.device if param is not None else "cpu")
        self._batch_size, self.capacity, self.spec = int(batch_size), int(capacity), spec
        shape = (spec.num_layers, self.batch_size, spec.num_kv_heads, self.capacity, spec.head_dim)
        self.key_storage = torch.zeros(shape, dtype=dtype, device=device)
        self.value_storage = torch.zeros(shape, dtype=dtype, device=device)
        self.kv_start = torch.zeros(self.batch_size, dtype=torch.int64, device=device)
        self.kv_end = torch.zeros(self.batch_size, dtype=torch.int64, device=device)
        self._positions = torch.arange(self.capacity, dtype=torch.int64, device=device)
        self.host_start: list[int] = [0] * self.batch_size
        self.padding_known = False  # host_start set by set_padding / set_start for this sequence batch
        self.length = 0  # tokens written per row (padding included): the host mirror of kv_end
        self.step: Step | None = None  # the step of the current (or last) forward pass
        # True: every pass sees the whole capacity (fixed shapes for a CUDA graph; the attention must
        # respect kv_end, as Kascade's does). False: a pass sees the keys written so far (a view).
        self.static_shapes = False
        self._write_index: torch.Tensor | None = None
        super().__init__(layers=[_Layer(self, i) for i in range(spec.num_layers)])
        from .hf import attach_cache

        attach_cache(model, self)

    # ------------------------------------------------------------------ state
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.key_storage.dtype

    @property
    def device(self) -> torch.device:
        return self.key_storage.device

    def reset(self) -> None:
        """Empty the cache (the buffers stay; their contents are ignored past ``kv_end``)."""
        self.length = 0
        self.host_start = [0] * self.batch_size
        self.padding_known = False
        self.kv_start.zero_()
        self.kv_end.zero_()
        self.step = None

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Take row bounds from a 2-D attention mask [B, L] of 1s and left-padding 0s (one host read).
        Raises KascadeInputError for any other pattern (right padding, holes)."""
        self.padding_known = True
        if attention_mask is None:
            self.host_start = [0] * self.batch_size
            self.kv_start.zero_()
            return
        if attention_mask.dim() != 2 or attention_mask.shape[0] != self.batch_size:
            raise KascadeInputError(f"attention_mask must be [{self.batch_size}, L], got {tuple(attention_mask.shape)}")
        m = attention_mask.to(torch.bool)
        if m.shape[1] > 1 and bool((m[:, 1:].int() < m[:, :-1].int()).any()):
            raise KascadeInputError("attention_mask must be left padding (0...0 1...1 per row); got right "
                                    "padding or holes, which KascadeCache does not store")
        starts = (~m).sum(dim=1)
        if bool((starts >= m.shape[1]).any()):
            raise KascadeInputError("attention_mask has a row with no token")
        self.host_start = [int(s) for s in starts.tolist()]
        self.kv_start.copy_(starts.to(self.kv_start.device))

    def set_start(self, kv_start: torch.Tensor) -> None:
        """Row starts (padding counts) from a device tensor (one host read), e.g. a KascadeMask's."""
        self.host_start = [int(s) for s in kv_start.tolist()]
        self.padding_known = True
        self.kv_start.copy_(kv_start.to(device=self.kv_start.device, dtype=torch.int64))

    def advance_host(self, q_length: int) -> None:
        """Advance the host mirror after a replayed (captured) step, whose device ops already ran."""
        self.length += int(q_length)

    def step_for(self, q_length: int, *, captured: bool = False) -> Step:
        """The step of a pass of q_length queries that begins now (host lengths after it)."""
        end = self.length
        lengths = None if captured else tuple(end - s for s in self.host_start)
        return Step(self.kv_start, self.kv_end, q_length, lengths=lengths,
                    kv_length=end if q_length > 1 or not self.static_shapes else None)

    # ------------------------------------------------------------------ writing
    def _begin(self, q_length: int) -> None:
        if self.length + q_length > self.capacity:
            raise KascadeInputError(f"KascadeCache holds {self.capacity} tokens per row; {self.length} are written "
                                    f"and this pass adds {q_length}")
        # device: the new end, and where this pass writes (both graph-capturable: no host values read)
        self.kv_end.add_(q_length)
        self._write_index = self.kv_end[:1] - q_length + self._positions[:q_length]
        self.length += q_length
        self.step = self.step_for(q_length, captured=torch.cuda.is_available()
                                  and self.device.type == "cuda" and torch.cuda.is_current_stream_capturing())

    def _write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if layer == 0:
            self._begin(key_states.shape[2])
        keys, values = self.key_storage[layer], self.value_storage[layer]
        keys.index_copy_(2, self._write_index, key_states.to(keys.dtype))
        values.index_copy_(2, self._write_index, value_states.to(values.dtype))
        if self.static_shapes:
            return keys, values
        return keys[:, :, : self.length], values[:, :, : self.length]

    # ------------------------------------------------------------------ Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0, *args) -> tuple[int, int]:
        # called before the pass writes its keys
        return (self.capacity if self.static_shapes else self.length + query_length), 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("KascadeCache does not support crop (assisted decoding)")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("KascadeCache does not support beam search (reorder_cache)")

    def owns(self, layer: int, key: torch.Tensor) -> bool:
        """Whether ``key`` is this cache's buffer of ``layer`` (the attention of a pass over this cache)."""
        return key.data_ptr() == self.key_storage[layer].data_ptr()


__all__ = ["KascadeCache"]
