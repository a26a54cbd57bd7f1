"""The fast path: launchers of the Triton kernels (:mod:`.decode`, :mod:`.prefill`, :mod:`.paged` on vLLM's
paged cache) and their shared helpers (:mod:`._launch`). They check what the kernels need and never
import the reference (kascade.reference, the definition of correct), which tests them.

The validated public ops that dispatch between these kernels and the reference are
:mod:`kascade.attention` (``kascade.dense_attention`` etc.); they lived here until 2026-12, and the old
names (``kascade.ops.dense_attention``, ...) keep working for one release with a DeprecationWarning.
"""

from __future__ import annotations

import warnings

_MOVED = ("Backend", "BACKENDS", "dense_attention", "anchor_attention", "sparse_attention", "default_backend",
          "triton_available")


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"kascade.ops.{name} moved to kascade.attention.{name}; the old name goes in the next "
                      f"release", DeprecationWarning, stacklevel=2)
        from .. import attention

        return getattr(attention, name)
    raise AttributeError(f"module 'kascade.ops' has no attribute {name!r}")
