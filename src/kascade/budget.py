"""The Top-k budget: how many keys a decode row or a prefill tile keeps.

Shared by the reference, the ops and kernel launchers, calibration and the baselines (it depends on
nothing else in kascade). The kernels compute the same integer formula on the device
(kascade.kernels.topk).
"""

from __future__ import annotations

import torch


def topk_budget(length, topk_fraction: float = 0.10, topk_floor: int = 128):
    """k = min(max(ceil(topk_fraction * length), topk_floor), length), for an int or an integer tensor.

    The ceiling is done in integer arithmetic on the fraction in parts per million, so 0.1 * 30 is 3,
    not 4, and a kernel computing it on the device gets the same number.
    """
    ppm = round(topk_fraction * 1_000_000)
    if isinstance(length, torch.Tensor):
        k = (length * ppm + 999_999) // 1_000_000
        return torch.minimum(torch.clamp(k, min=topk_floor), length)
    length = int(length)
    k = (length * ppm + 999_999) // 1_000_000
    return min(max(k, topk_floor), length)


def prefill_tile_is_dense(prefix: int, topk_fraction: float, topk_floor: int) -> bool:
    """A prefill tile attends densely when its whole prefix fits in its budget."""
    return prefix <= topk_budget(prefix, topk_fraction, topk_floor)
