"""The `kascade` command. Each subcommand lives in the module that owns it and registers itself.

A module listed in SUBCOMMANDS exposes ``register(subparsers)``, which adds its parser(s) and sets
``func`` (called with the parsed args; returns an exit code or None) via ``set_defaults``.
Modules whose optional dependencies are missing are skipped, with the reason shown in --help.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = (
    "kascade.demo",  # kascade demo
    "kascade.integrations.generate",  # kascade generate
    "kascade.calibrate.cli",  # kascade calibrate
    "kascade.bench.cli",  # kascade bench decode|prefill
    "kascade.eval.cli",  # kascade eval
    "kascade.plans.cli",  # kascade plans [show NAME]
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kascade", description="Kascade sparse attention for long-context LLMs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    unavailable = []
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("kascade."):
                continue  # not built yet in this version
            unavailable.append(f"{name.rsplit('.', 1)[-1]} (needs {exc.name})")
            continue
        module.register(sub)
    if unavailable:
        parser.epilog = "unavailable: " + ", ".join(unavailable)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    code = args.func(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
