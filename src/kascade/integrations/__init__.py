"""Framework integrations, one module per framework. ``hf``: Hugging Face transformers."""

from __future__ import annotations


def enable(model, plan_or_method, **kwargs):
    """Enable Kascade on a Hugging Face model; see :func:`kascade.integrations.hf.enable`."""
    from .hf import enable as _enable

    return _enable(model, plan_or_method, **kwargs)


def disable(model) -> None:
    """Restore a model's previous attention; see :func:`kascade.integrations.hf.disable`."""
    from .hf import disable as _disable

    _disable(model)


__all__ = ["enable", "disable"]
