"""Fast generation for Hugging Face decoders: a KascadeCache, chunked prefill, CUDA-graph decode steps.

``generate()`` in transformers runs each decode step eagerly: Python and launch overhead for every
layer, a concatenating cache, host reads. Here a :class:`Generator` owns a :class:`KascadeCache`,
prefills the prompt in chunks (eager: its kernels are long), and captures one whole decode step (every
layer, the sampling of the next token, the advance of the cache) in a CUDA graph that is replayed for
every token with no host synchronisation. The model runs with whatever attention ``kascade.enable`` set
(a plan for Kascade, or ``variant="dense"`` for the dense baseline through the same cache and graphs).

    gen = kascade.Generator(model, batch_size=1, capacity=len_prompt + 256)
    result = gen.generate(input_ids, max_new_tokens=256)   # result.tokens, result.ttft_s, ...

On CPU (or with ``cuda_graph=False``) the same steps run eagerly.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from .integrations.cache import KascadeCache
from .validation import KascadeInputError


@dataclass
class GenerationResult:
    """tokens: int64 [B, n] new tokens (n <= max_new_tokens: generation stops when every row produced
    eos_token_id; later tokens of a finished row are eos_token_id). ttft_s: seconds from the call to the
    first new token on the host (prefill + its sampling). decode_s: seconds of the remaining n - 1 steps."""

    tokens: torch.Tensor
    ttft_s: float
    decode_s: float

    @property
    def decode_steps(self) -> int:
        return max(0, self.tokens.shape[1] - 1)


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x names the cache argument ``cache`` (``past_key_values`` goes away in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sample_next(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_p: float) -> torch.Tensor:
    """Next token per row from logits [B, V]: argmax, or sampling with temperature and nucleus (top-p)
    by the exponential-race trick (argmax of p / E, E ~ Exp(1)): no host read, graph-capturable."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # keep the smallest prefix holding top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    race = probs / torch.empty_like(probs).exponential_()
    return race.argmax(dim=-1)


class Generator:
    """Generation over a preallocated KascadeCache of ``batch_size`` rows x ``capacity`` tokens.

    prefill_chunk: prompt tokens per prefill pass, rounded down to a multiple of 64 (long prompts in
    several passes bound the activation memory; one pass is fastest: it may use cuDNN's dense kernel). cuda_graph: capture the
    decode step (CUDA only). The graph is captured on the first generate() and reused while the sampling
    settings stay the same. compile: torch.compile the decode forward around
    the attention (fewer, fused kernels for the model's norms, rotary and MLP; the first step compiles);
    None: on with the CUDA graph (measured 8-16 % faster per step on the H100, dense and Kascade alike).
    A Generator serves batches of up to ``batch_size`` rows (its bucket): smaller batches are padded with
    copies of their last row, whose tokens are dropped.
    """

    def __init__(self, model, *, batch_size: int, capacity: int, prefill_chunk: int = 131072,
                 cuda_graph: bool = True, compile: bool | None = None) -> None:
        if prefill_chunk < 1:
            raise KascadeInputError(f"prefill_chunk must be positive, got {prefill_chunk}")
        from .integrations.hf import method_of

        if method_of(model) is None:
            raise KascadeInputError("Generator needs kascade.enable(model, plan) first (variant='dense' for the "
                                    "dense baseline): its cache shows the attention the whole capacity")
        self.model = model
        self.cache = KascadeCache(model, batch_size, capacity)
        self.cache.static_shapes = True  # fixed shapes for the captured decode step
        # Rolling prefill pools each tile of T queries; a chunk boundary inside a tile would pool it in two
        # halves, so chunks are multiples of 64 (every tile size the kernels take). Rows with left padding
        # start tiles at their own first token, so for them a boundary may still fall inside a tile.
        self.prefill_chunk = max(64, int(prefill_chunk) // 64 * 64)
        self.device = self.cache.device
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        self._cache_arg = _cache_kwarg(model)
        B = self.cache.batch_size
        self._ids = torch.zeros((B, 1), dtype=torch.long, device=self.device)
        self._pos = torch.zeros((B, 1), dtype=torch.long, device=self.device)
        # torch.compile of the decode forward: fuses the model's own small kernels (norms, rotary, MLP
        # activation, residual adds) between the attention calls, which stay graph breaks; prefill runs
        # the model as it is (its kernels are long, and its shapes change).
        self._decode_model = model
        if compile is None:  # measured faster on the H100 for dense and Kascade alike (notes_e2e.md)
            compile = self.cuda_graph
        if compile and not self.cuda_graph:
            # the cache's host length is a guard of the compiled code: only a captured step avoids a
            # recompile per step
            raise KascadeInputError("compile=True needs the CUDA-graph decode step (CUDA, cuda_graph=True)")
        if compile:
            from torch._dynamo import config as dynamo_config

            # each decoder layer is a guard variant of the same code objects: allow one per layer
            n = self.cache.spec.num_layers
            dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 4 * n)
            dynamo_config.accumulated_cache_size_limit = max(dynamo_config.accumulated_cache_size_limit, 16 * n)
            self._decode_model = torch.compile(model, dynamic=False)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: tuple | None = None
        self._graph_out: torch.Tensor | None = None
        self._graph_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------ passes
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, model=None) -> torch.Tensor:
        out = (self.model if model is None else model)(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                                    **{self._cache_arg: self.cache})
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Write the prompt into the (reset) cache; returns the last position's logits [B, V]."""
        B, L = input_ids.shape
        if B != self.cache.batch_size:
            raise KascadeInputError(f"input_ids has batch {B}; this Generator's cache holds {self.cache.batch_size}")
        if L < 1:
            raise KascadeInputError("input_ids is empty")
        self.cache.reset()
        self.cache.set_padding(attention_mask)
        input_ids = input_ids.to(self.device)
        start = torch.tensor(self.cache.host_start, device=self.device)[:, None]
        logits = None
        for lo in range(0, L, self.prefill_chunk):
            hi = min(L, lo + self.prefill_chunk)
            pos = (torch.arange(lo, hi, device=self.device)[None, :] - start).clamp_(min=0)
            logits = self._forward(input_ids[:, lo:hi], pos)
        self._pos.copy_(L - start)
        return logits

    def _decode_step(self, sampling: dict) -> torch.Tensor:
        """One decode pass from the static input buffers; advances them for the next step."""
        logits = self._forward(self._ids, self._pos, self._decode_model)
        self._graph_logits = logits  # the captured step's logits (a static buffer under the graph)
        nxt = sample_next(logits, **sampling)
        self._ids.copy_(nxt[:, None])
        self._pos.add_(1)
        return nxt

    def _capture(self, sampling: dict) -> None:
        """Capture one decode step. Warm-up passes run for real first (Triton compiles, allocator pools);
        the cache's state (host and device) is restored after, so capture changes nothing."""
        cache = self.cache
        saved = (cache.length, self._ids.clone(), self._pos.clone(), cache.kv_end.clone())

        def restore():
            cache.length = saved[0]
            self._ids.copy_(saved[1])
            self._pos.copy_(saved[2])
            cache.kv_end.copy_(saved[3])

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_step(sampling)
                restore()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._decode_step(sampling)
        restore()
        self._graph, self._graph_out = graph, out
        self._graph_key = tuple(sorted(sampling.items()))

    def decode_step(self, sampling: dict) -> torch.Tensor:
        """Next tokens [B] of one decode step (graph replay when captured)."""
        if self.cache.length >= self.cache.capacity:  # a replay has no check of its own
            raise KascadeInputError(f"the cache is full ({self.cache.capacity} tokens per row)")
        if not self.cuda_graph:
            return self._decode_step(sampling)
        # the cache (batch, capacity) is fixed for a Generator: only the sampling settings select a graph
        if self._graph is None or self._graph_key != tuple(sorted(sampling.items())):
            self._capture(sampling)
        self._graph.replay()
        self.cache.advance_host(1)
        return self._graph_out

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, eos_token_id: int | None = None, seed: int | None = None,
                 check_every: int = 16) -> GenerationResult:
        """Prefill ``input_ids`` [B, L] (left-padded when ``attention_mask`` has zeros) and generate up to
        max_new_tokens tokens per row. EOS is checked on the host every ``check_every`` steps (the only
        host reads of the decode loop)."""
        if max_new_tokens < 1:
            raise KascadeInputError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if do_sample and not (temperature > 0 and 0 < top_p <= 1):
            raise KascadeInputError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        rows = input_ids.shape[0]
        if not 1 <= rows <= self.cache.batch_size:
            raise KascadeInputError(f"input_ids has batch {rows}; this Generator serves 1..{self.cache.batch_size} "
                                    "rows")
        if rows < self.cache.batch_size:  # pad to this Generator's bucket: one graph serves every smaller batch
            pad = self.cache.batch_size - rows
            input_ids = torch.cat([input_ids, input_ids[-1:].expand(pad, -1)])
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask[-1:].expand(pad, -1)])
            res = self.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, eos_token_id=eos_token_id, seed=seed,
                                check_every=check_every)
            res.tokens = res.tokens[:rows]
            return res
        L = input_ids.shape[1]
        if L + max_new_tokens - 1 > self.cache.capacity:
            raise KascadeInputError(f"prompt {L} + {max_new_tokens} new tokens exceed the cache capacity "
                                    f"{self.cache.capacity} (+1: the last token is not written)")
        if seed is not None:
            torch.manual_seed(seed)
        sampling = dict(do_sample=bool(do_sample), temperature=float(temperature), top_p=float(top_p))
        B = input_ids.shape[0]
        tokens = torch.empty((B, max_new_tokens), dtype=torch.long, device=self.device)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        logits = self.prefill(input_ids, attention_mask)
        first = sample_next(logits, **sampling)
        tokens[:, 0] = first
        self._ids.copy_(first[:, None])
        sync()
        t1 = time.perf_counter()
        n = 1
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        if eos_token_id is not None:
            done |= first == eos_token_id
        while n < max_new_tokens:
            if eos_token_id is not None and n % check_every == 0 and bool(done.all()):
                break
            nxt = self.decode_step(sampling)
            if eos_token_id is not None:
                tokens[:, n] = torch.where(done, eos_token_id, nxt)
                done |= nxt == eos_token_id
            else:
                tokens[:, n] = nxt
            n += 1
        sync()
        t2 = time.perf_counter()
        return GenerationResult(tokens=tokens[:, :n], ttft_s=t1 - t0, decode_s=t2 - t1)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 64, cuda_graph: bool = True, prefill_chunk: int = 131072,
             **kwargs) -> GenerationResult:
    """One-call fast generation (builds a :class:`Generator` sized for this prompt). For repeated calls
    keep a Generator: its CUDA graph and cache are reused."""
    gen = Generator(model, batch_size=input_ids.shape[0], capacity=input_ids.shape[1] + max_new_tokens,
                    prefill_chunk=prefill_chunk, cuda_graph=cuda_graph)
    return gen.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs)


def warmup(model, *, batch_size: int = 1, capacity: int = 4096, prompt_length: int = 512,
           cuda_graph: bool = True) -> Generator:
    """Compile every kernel variant a model's geometry needs (prefill in one and in two chunks, a decode
    step, its CUDA graph) on a short random prompt. Lengths are runtime values in the kernels, so later
    prompts of any length compile nothing new. Returns the Generator (reuse it: its graph is captured)."""
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else \
        model.config.vocab_size
    prompt_length = min(prompt_length, capacity - 2)
    gen = Generator(model, batch_size=batch_size, capacity=capacity, prefill_chunk=prompt_length,
                    cuda_graph=cuda_graph)
    device = gen.device
    ids = torch.randint(0, vocab, (batch_size, prompt_length), device=device)
    gen.generate(ids, max_new_tokens=2)
    gen.prefill_chunk = max(1, prompt_length // 2)  # chunked prefill: the Triton dense/anchor paths
    gen.generate(ids, max_new_tokens=2)
    gen.prefill_chunk = prompt_length
    return gen


__all__ = ["Generator", "GenerationResult", "generate", "warmup", "sample_next"]
