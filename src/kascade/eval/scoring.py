"""RULER's scoring: case-insensitive substring match of the reference answers in the prediction.

* ``string_match_all`` (needle, variable-tracking and word-extraction tasks): the share of references
  found, x100.
* ``string_match_part`` (QA): 100 if any reference is found, else 0.

Predictions are first cleaned as RULER does (control characters become newlines, then strip).
``ordered_match`` is ours, for the long-output extraction task: the share of references that appear in
the prediction in the right relative order (longest common subsequence of the found order).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    pred = postprocess(prediction).lower()
    return 100.0 * sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    pred = postprocess(prediction).lower()
    return 100.0 * max(float(r.lower() in pred) for r in references)


def ordered_match(prediction: str, references: Sequence[str]) -> float:
    """100 x (longest run of references found in their given order) / number of references."""
    pred = postprocess(prediction).lower()
    found = sorted((pred.find(r.lower()), i) for i, r in enumerate(references) if r.lower() in pred)
    order = [i for _, i in found]
    # longest increasing subsequence of reference indices, O(n^2) for a handful of references
    best = [1] * len(order)
    for a in range(len(order)):
        for b in range(a):
            if order[b] < order[a]:
                best[a] = max(best[a], best[b] + 1)
    return 100.0 * (max(best) if best else 0) / len(references)


METRICS = {"all": string_match_all, "part": string_match_part}


def score(prediction: str, references: Sequence[str], metric: str) -> float:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if not references:
        raise ValueError("a sample needs at least one reference answer")
    return METRICS[metric](prediction, references)
