"""Plans shipped with kascade (each file records its exact command in its provenance).

Made by ``kascade calibrate``: ``load_shipped("smollm2-135m")`` / ``"qwen2.5-0.5b"`` / ``"qwen2.5-1.5b"``,
names following :mod:`kascade.models`. Converted from the Kascade authors' published anchors and head maps
(github.com/microsoft/kascade, MIT; ``scripts/convert_authors_plans.py``): ``"llama-3.1-8b-instruct"``,
``"deepseek-r1-distill-llama-8b"``, ``"qwen3-8b"``. ``kascade plans`` lists them all.
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


def source_of(plan: Plan) -> str:
    """Who made a plan: ``provenance["source"]`` (the authors' plans), else "kascade calibrate"."""
    return str(plan.provenance.get("source", "kascade calibrate"))


def load_shipped(name: str) -> Plan:
    """The plan shipped for model ``name`` (a :mod:`kascade.models` name)."""
    return Plan.from_dict(__import__("json").loads(path_of(name).read_text()))


__all__ = ["load_shipped", "shipped", "path_of", "source_of"]
