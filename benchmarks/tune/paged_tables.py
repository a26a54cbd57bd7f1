"""Block tables of the paged benches (torch only: bench_paged.py --contig-only runs without kascade.ops.paged)."""

import torch

TABLES = ("random", "ordered", "reversed")


def block_table(nb, order, device):
    """A block table [1, nb] over blocks 0 .. nb - 1. random: any block anywhere (a long-running engine's
    worst case); ordered: consecutive blocks (what a fresh vLLM engine hands one request: its free-block
    queue starts in block order); reversed: consecutive blocks backwards (vLLM frees a request's blocks
    tail first, so a later request takes freed runs in descending order)."""
    if order == "random":
        rows = torch.randperm(nb, device=device)
    elif order == "ordered":
        rows = torch.arange(nb, device=device)
    elif order == "reversed":
        rows = torch.arange(nb - 1, -1, -1, device=device)
    else:
        raise ValueError(f"block table order {order!r}: expected one of {TABLES}")
    return rows.to(torch.int32).view(1, nb).contiguous()
