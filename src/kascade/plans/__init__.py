"""Plans shipped with kascade, made by ``kascade calibrate`` (each file records its exact command).

``load_shipped("smollm2-135m")`` / ``load_shipped("qwen2.5-0.5b")``; names follow :mod:`kascade.models`.
"""

from __future__ import annotations

from importlib import resources

from ..plan import Plan, PlanError


def shipped() -> list[str]:
    """Names of the shipped plans."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def path_of(name: str):
    path = resources.files(__name__) / f"{name}.json"
    if not path.is_file():
        raise PlanError(f"no shipped plan named {name!r}; shipped plans: {shipped()}")
    return path


def load_shipped(name: str) -> Plan:
    """The plan shipped for model ``name`` (a :mod:`kascade.models` name)."""
    return Plan.from_dict(__import__("json").loads(path_of(name).read_text()))


__all__ = ["load_shipped", "shipped", "path_of"]
