"""The `kascade` command. Each subcommand lives in the module that owns it and registers itself.

A module listed in SUBCOMMANDS exposes ``register(subparsers)``, which adds its parser(s) and sets
``func`` (called with the parsed args; returns an exit code or None) via ``set_defaults``.
Modules whose optional dependencies are missing are skipped, with the reason shown in --help.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

SUBCOMMANDS = (
    "kascade.demo",  # kascade demo
    "kascade.integrations.generate",  # kascade generate
    "kascade.calibrate.cli",  # kascade calibrate
    "kascade.bench.cli",  # kascade bench decode|prefill
    "kascade.eval.cli",  # kascade eval
    "kascade.plans.cli",  # kascade plans [show NAME]
)


class DeprecatedFlag(argparse.Action):
    """An old spelling of a flag, kept for one release: prints a deprecation message to stderr (and
    issues a DeprecationWarning), then sets the new flag's dest: to ``const`` for a switch (nargs=0),
    else to the values given.

        p.add_argument("--dense-prefill", dest="decode_only", action=DeprecatedFlag, const=True,
                       use="--decode-only", help="deprecated: use --decode-only")
    """

    def __init__(self, option_strings, dest, *, use: str, nargs=0, const=None, **kwargs):
        self.use = use
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        message = f"{option_string} is deprecated and will be removed in the next release; use {self.use}"
        print(f"kascade: warning: {message}", file=sys.stderr)
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


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
