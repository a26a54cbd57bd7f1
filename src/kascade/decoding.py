"""The one token-by-token decode loop over a Hugging Face model and its prefilled cache.

Used by the demo (greedy, stop at EOS), the eval runner (greedy, left-padded batches), the decode-heavy
eval (teacher forcing, several methods in lockstep) and scripts/compare_plans.py (greedy dense
continuation, then teacher forcing of it under each plan). ``kascade.Generator`` has its own decode
step (static buffers, CUDA graph); this loop is the plain HF ``model(...)`` path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


@torch.no_grad()  # around each resumption of the generator only (grad mode never leaks to the caller)
def decode_loop(
    model,
    past,
    logits: torch.Tensor | None = None,
    *,
    steps: int | None = None,
    feed: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    on_token: Callable[[torch.Tensor], bool] | None = None,
) -> Iterator[torch.Tensor]:
    """Decode ``steps`` tokens per row from the cache ``past``; a generator of each step's logits.

    Each step picks every row's next input token, [B] int64: ``feed[:, i]`` (teacher forcing; feed is
    [B, n] and steps defaults to n) or, without feed, the argmax of the last logits (greedy; ``logits``
    [B, *, V] are the prefill's, their last position is used). ``on_token(tokens)`` sees the tokens first
    and may end the loop before the forward by returning True (EOS handling). Then one forward of the
    model on the tokens extends ``past`` and the generator yields the new last-position logits [B, V].
    The caller may also stop early by leaving the loop.

    ``attention_mask`` [B, n_prefill] (a left-padded batch): each step appends a column of ones and
    passes position ids counted from each row's last real token; None: neither is passed (one row or
    unpadded rows, the model infers positions from the cache).
    """
    if feed is None and logits is None:
        raise ValueError("decode_loop needs the prefill's logits (greedy) or feed tokens (teacher forcing)")
    if steps is None:
        if feed is None:
            raise ValueError("decode_loop: steps is required for greedy decoding")
        steps = feed.shape[1]
    positions = None if attention_mask is None else attention_mask.sum(-1, keepdim=True) - 1
    for i in range(steps):
        tokens = feed[:, i] if feed is not None else logits[:, -1].argmax(-1)
        if on_token is not None and on_token(tokens):
            return
        extra = {}
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
            positions = positions + 1
            extra = dict(attention_mask=attention_mask, position_ids=positions)
        res = model(input_ids=tokens[:, None], past_key_values=past, use_cache=True, **extra)
        past, logits = res.past_key_values, res.logits
        yield logits[:, -1]
