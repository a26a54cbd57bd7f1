"""The calibrated artifact: which layers are anchors, how reuse heads map to anchor heads, the budget.

A plan is tied to the model it was calibrated for (its ``ModelSpec``); loading validates the plan on its
own and ``Plan.check_model`` validates it against a model before use. JSON carries a schema version so
old files fail loudly instead of being misread.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


class PlanError(ValueError):
    """A plan is malformed or does not fit the model it is used with."""


@dataclass(frozen=True)
class ModelSpec:
    """The identity of the model a plan was made for: everything the head map depends on."""

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    name: str = ""

    def __post_init__(self) -> None:
        for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise PlanError(f"model.{key} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise PlanError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                f"({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Plan:
    """Anchors, head map and budget for one model.

    head_map[j][h] is the KV head of layer j's anchor (``anchor_of(j)``) whose Top-k indices KV head h
    of layer j reuses. Anchor rows are the identity.

    tp_sizes: the tensor-parallel sizes the plan was calibrated to be valid for (``kascade calibrate --tp``),
    () when none was recorded. Under TP size t, KV head h lives on shard h // (Hkv / t); the head map is
    valid for t when every reuse head maps to an anchor head of its own shard (:meth:`valid_for_tp`, computed
    from the head map, so any plan can be checked). :meth:`shard` gives one rank's plan.

    layer_budget_scale: optional per-layer budget multipliers (``kascade calibrate --layer-budgets``), () when
    absent. Entry j scales layer j's Top-k budget for the methods that read it (``kascade_layer_budget``;
    the paper's ``kascade`` ignores it). Layer 0 attends densely, so entry 0 must be 1.0; the mean over layers
    1..L-1 must be 1.0, so the average number of attended keys stays the plan's budget
    (:func:`kascade.variants.layer_budgets` turns the scales into integer budgets with exactly that mean).
    """

    model: ModelSpec
    anchor_layers: tuple[int, ...]
    head_map: tuple[tuple[int, ...], ...]
    topk_fraction: float = 0.10
    topk_floor: int = 128
    tile_size: int = 32
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)
    tp_sizes: tuple[int, ...] = ()
    layer_budget_scale: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchor_layers", tuple(int(a) for a in self.anchor_layers))
        object.__setattr__(self, "tp_sizes", tuple(self.tp_sizes))
        object.__setattr__(self, "layer_budget_scale", tuple(self.layer_budget_scale))
        object.__setattr__(self, "head_map", tuple(tuple(int(g) for g in row) for row in self.head_map))
        self.validate()

    # ---------------------------------------------------------------- construction
    @classmethod
    def identity(
        cls,
        model: ModelSpec,
        anchor_layers: tuple[int, ...] | list[int] = (0,),
        *,
        topk_fraction: float = 0.10,
        topk_floor: int = 128,
        tile_size: int = 32,
        provenance: dict[str, Any] | None = None,
    ) -> "Plan":
        """A plan whose reuse layers keep their own head numbering (the paper's "no remap" ablation)."""
        row = tuple(range(model.num_kv_heads))
        return cls(
            model=model,
            anchor_layers=tuple(anchor_layers),
            head_map=tuple(row for _ in range(model.num_layers)),
            topk_fraction=topk_fraction,
            topk_floor=topk_floor,
            tile_size=tile_size,
            provenance=dict(provenance or {}),
        )

    # ---------------------------------------------------------------- queries
    def anchor_of(self, layer: int) -> int:
        """The governing anchor of ``layer``: the closest anchor at or before it."""
        if not 0 <= layer < self.model.num_layers:
            raise PlanError(f"layer {layer} out of range: the model has {self.model.num_layers} layers")
        return max(a for a in self.anchor_layers if a <= layer)

    def is_anchor(self, layer: int) -> bool:
        return layer in self.anchor_layers

    # ---------------------------------------------------------------- tensor parallelism
    def tp_crossings(self, tp_size: int) -> list[tuple[int, int, int]]:
        """(layer j, KV head h, anchor KV head g) for every reuse head whose anchor head lies in another
        shard under TP size ``tp_size`` (which must divide the KV heads)."""
        self._check_tp_size(tp_size)
        per = self.model.num_kv_heads // tp_size
        return [(j, h, g) for j, row in enumerate(self.head_map) for h, g in enumerate(row) if g // per != h // per]

    def valid_for_tp(self, tp_size: int) -> bool:
        """Whether every reuse head maps to an anchor head of its own shard under TP size ``tp_size``
        (False where ``tp_size`` does not divide the KV heads)."""
        if not isinstance(tp_size, int) or tp_size < 1 or self.model.num_kv_heads % tp_size:
            return False
        return not self.tp_crossings(tp_size)

    def shard(self, rank: int, tp_size: int) -> "Plan":
        """The plan of TP rank ``rank`` of ``tp_size``: the model with Hq/t query and Hkv/t KV heads (KV
        heads rank*Hkv/t .. (rank+1)*Hkv/t - 1 of the full model) and the head map in local head numbers.
        PlanError where t does not divide the head counts or the head map crosses shards."""
        self._check_tp_size(tp_size)
        if not isinstance(rank, int) or not 0 <= rank < tp_size:
            raise PlanError(f"TP rank {rank!r} out of range 0..{tp_size - 1}")
        crossings = self.tp_crossings(tp_size)
        if crossings:
            per = self.model.num_kv_heads // tp_size
            j, h, g = crossings[0]
            raise PlanError(
                f"the plan's head map crosses tensor-parallel shards at TP size {tp_size}: layer {j} KV head {h} "
                f"(shard {h // per}) reuses KV head {g} (shard {g // per}) of anchor layer {self.anchor_of(j)}"
                f"{f' (and {len(crossings) - 1} more)' if len(crossings) > 1 else ''}; calibrate a plan with "
                f"`kascade calibrate --tp {tp_size}` (valid TP sizes recorded in this plan: "
                f"{list(self.tp_sizes) or 'none'})"
            )
        from dataclasses import replace

        m = self.model
        per = m.num_kv_heads // tp_size
        lo = rank * per
        spec = replace(m, num_heads=m.num_heads // tp_size, num_kv_heads=per)
        rows = tuple(tuple(g - lo for g in row[lo:lo + per]) for row in self.head_map)
        prov = dict(self.provenance, tp_shard={"rank": rank, "tp_size": tp_size})
        return Plan(model=spec, anchor_layers=self.anchor_layers, head_map=rows, topk_fraction=self.topk_fraction,
                    topk_floor=self.topk_floor, tile_size=self.tile_size, provenance=prov,
                    layer_budget_scale=self.layer_budget_scale)

    def _check_tp_size(self, tp_size: int) -> None:
        m = self.model
        if not isinstance(tp_size, int) or tp_size < 1:
            raise PlanError(f"TP size must be a positive integer, got {tp_size!r}")
        if m.num_kv_heads % tp_size:
            raise PlanError(f"TP size {tp_size} does not divide the model's {m.num_kv_heads} KV heads "
                            f"({m.num_heads} query heads)")

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        n_layers, n_kv = self.model.num_layers, self.model.num_kv_heads
        anchors = self.anchor_layers
        if not anchors or anchors[0] != 0:
            raise PlanError(f"layer 0 must be an anchor, got anchor_layers={list(anchors)}")
        if list(anchors) != sorted(set(anchors)):
            raise PlanError(f"anchor_layers must be sorted and unique, got {list(anchors)}")
        if anchors[-1] >= n_layers:
            raise PlanError(
                f"anchor layer {anchors[-1]} out of range: the model has {n_layers} layers (0..{n_layers - 1})"
            )
        if len(self.head_map) != n_layers:
            raise PlanError(f"head_map has {len(self.head_map)} rows, expected one per layer ({n_layers})")
        for j, row in enumerate(self.head_map):
            if len(row) != n_kv:
                raise PlanError(f"head_map[{j}] has {len(row)} entries, expected num_kv_heads={n_kv}")
            bad = [g for g in row if not 0 <= g < n_kv]
            if bad:
                raise PlanError(f"head_map[{j}] has KV head {bad[0]} out of range 0..{n_kv - 1}")
            if j in anchors and tuple(row) != tuple(range(n_kv)):
                raise PlanError(f"head_map[{j}] must be the identity because layer {j} is an anchor, got {list(row)}")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise PlanError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if not isinstance(self.topk_floor, int) or self.topk_floor < 1:
            raise PlanError(f"topk_floor must be a positive integer, got {self.topk_floor!r}")
        if not isinstance(self.tile_size, int) or self.tile_size < 1:
            raise PlanError(f"tile_size must be a positive integer, got {self.tile_size!r}")
        for t in self.tp_sizes:
            if not isinstance(t, int) or isinstance(t, bool) or t < 1:
                raise PlanError(f"tp_sizes must be positive integers, got {list(self.tp_sizes)}")
            if not self.valid_for_tp(t):
                what = (f"does not divide the {n_kv} KV heads" if n_kv % t
                        else f"is crossed by the head map ({len(self.tp_crossings(t))} reuse heads map to another shard)")
                raise PlanError(f"tp_sizes lists {t}, but TP size {t} {what}")
        if self.layer_budget_scale:
            self._check_layer_budget_scale()

    # Tolerance of the mean of layer_budget_scale over layers 1..L-1 (JSON keeps 6 decimals per entry).
    LAYER_BUDGET_MEAN_TOL = 1e-4

    def _check_layer_budget_scale(self) -> None:
        import math

        scales, n_layers = self.layer_budget_scale, self.model.num_layers
        if len(scales) != n_layers:
            raise PlanError(f"layer_budget_scale has {len(scales)} entries, expected one per layer ({n_layers})")
        for j, x in enumerate(scales):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
                raise PlanError(f"layer_budget_scale[{j}] must be a positive finite number, got {x!r}")
        if scales[0] != 1.0:
            raise PlanError(f"layer_budget_scale[0] must be 1.0 (layer 0 attends densely), got {scales[0]!r}")
        if n_layers > 1:
            mean = sum(scales[1:]) / (n_layers - 1)
            if abs(mean - 1.0) > self.LAYER_BUDGET_MEAN_TOL:
                raise PlanError(f"layer_budget_scale must average 1.0 over layers 1..{n_layers - 1} (the plan's "
                                f"budget on average), got mean {mean:.6f}")

    def check_model(self, spec: ModelSpec) -> None:
        """Raise if this plan was made for a model of another shape than ``spec``."""
        mine = self.model
        for key, what in (
            ("num_layers", "layers"),
            ("num_heads", "query heads"),
            ("num_kv_heads", "KV heads"),
            ("head_dim", "head dim"),
        ):
            a, b = getattr(mine, key), getattr(spec, key)
            if a != b:
                raise PlanError(
                    f"plan was made for a model with {a} {what} ({mine.name or mine.architecture}), "
                    f"this model has {b} {what} ({spec.name or spec.architecture})"
                )

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema_version": SCHEMA_VERSION,
            "model": asdict(self.model),
            "anchor_layers": list(self.anchor_layers),
            "head_map": [list(r) for r in self.head_map],
            "topk_fraction": self.topk_fraction,
            "topk_floor": self.topk_floor,
            "tile_size": self.tile_size,
        }
        if self.tp_sizes:  # written only when recorded: plans without it keep their JSON (and hashes) unchanged
            data["tp_sizes"] = list(self.tp_sizes)
        if self.layer_budget_scale:  # likewise optional
            data["layer_budget_scale"] = list(self.layer_budget_scale)
        data["provenance"] = self.provenance
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(f"plan schema_version is {version!r}, this kascade reads version {SCHEMA_VERSION}")
        known = {"schema_version", "model", "anchor_layers", "head_map", "topk_fraction", "topk_floor",
                 "tile_size", "provenance", "tp_sizes", "layer_budget_scale"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"plan has unknown fields {unknown}; expected only {sorted(known)}")
        missing = sorted({"model", "anchor_layers", "head_map"} - set(data))
        if missing:
            raise PlanError(f"plan is missing required fields {missing}")
        try:
            model = ModelSpec(**data["model"])
        except TypeError as exc:
            raise PlanError(f"plan.model is malformed: {exc}") from None
        return cls(
            model=model,
            anchor_layers=tuple(data["anchor_layers"]),
            head_map=tuple(tuple(r) for r in data["head_map"]),
            topk_fraction=float(data.get("topk_fraction", 0.10)),
            topk_floor=int(data.get("topk_floor", 128)),
            tile_size=int(data.get("tile_size", 32)),
            provenance=dict(data.get("provenance", {})),
            tp_sizes=tuple(data.get("tp_sizes", ())),
            layer_budget_scale=tuple(data.get("layer_budget_scale", ())),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise PlanError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def with_budget(self, topk_fraction: float | None = None, topk_floor: int | None = None) -> "Plan":
        """The same anchors and head map with another Top-k budget."""
        from dataclasses import replace

        return replace(
            self,
            topk_fraction=self.topk_fraction if topk_fraction is None else topk_fraction,
            topk_floor=self.topk_floor if topk_floor is None else topk_floor,
        )
