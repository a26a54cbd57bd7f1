"""`kascade plans`: list the shipped plans; `kascade plans show NAME` prints one plan's JSON."""

from __future__ import annotations

import argparse
import sys

from ..plan import PlanError
from . import load_shipped, path_of, shipped, source_of


def register(subparsers) -> None:
    p = subparsers.add_parser("plans", help="list the shipped plans (`kascade plans show NAME`: one plan's JSON)",
                              description="List the plans shipped with kascade, or print one of them.")
    sub = p.add_subparsers(dest="plans_command", metavar="{show}")
    show = sub.add_parser("show", help="print a shipped plan's JSON")
    show.add_argument("name", help="a shipped plan (see `kascade plans`)")
    p.set_defaults(func=main)


def _row(name: str) -> list[str]:
    plan = load_shipped(name)
    m = plan.model
    model = f"{m.architecture} {m.num_layers}L {m.num_heads}q/{m.num_kv_heads}kv d{m.head_dim}"
    budget = f"{plan.topk_fraction:.0%} >= {plan.topk_floor}, tile {plan.tile_size}"
    return [name, model, " ".join(map(str, plan.anchor_layers)), budget, source_of(plan)]


def table() -> str:
    rows = [["name", "model", "anchors", "budget", "source"]] + [_row(n) for n in shipped()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(args: argparse.Namespace) -> int:
    if getattr(args, "plans_command", None) == "show":
        try:
            sys.stdout.write(path_of(args.name).read_text())
        except PlanError as exc:
            print(f"kascade plans show: {exc}", file=sys.stderr)
            return 1
        return 0
    print(table())
    print("\n`kascade plans show NAME` prints a plan (save it for --plan); in Python: "
          "kascade.plans.load_shipped(NAME). Provenance (command, source, license) is in each plan.")
    return 0
