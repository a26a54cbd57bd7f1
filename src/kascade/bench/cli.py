"""`kascade bench decode|prefill|generate|serve`. The prefill benchmark is optional: without kascade.bench.prefill only
decode is offered."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark the kernels against the best dense kernel")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    from . import decode

    p = sub.add_parser("decode", help="decode kernels: layer 0, anchor, reuse vs dense (one query per row)",
                       description=decode.__doc__.split("\n\n")[0])
    decode.add_arguments(p)
    p.set_defaults(func=decode.run)
    from . import generate

    p = sub.add_parser("generate", help="end to end: time to first token and decode tokens/s, Kascade vs dense",
                       description=generate.__doc__.split("\n\n")[0])
    generate.add_arguments(p)
    p.set_defaults(func=generate.run)
    from . import serve

    p = sub.add_parser("serve", help="vLLM offline: the Kascade backend vs vLLM's FLASH_ATTN / TRITON_ATTN",
                       description=serve.__doc__.split("\n\n")[0])
    serve.add_arguments(p)
    p.set_defaults(func=serve.run)
    try:
        from .prefill import add_arguments, run
    except ImportError:
        return
    p = sub.add_parser("prefill", help="rolling prefill kernels vs dense")
    add_arguments(p)
    p.set_defaults(func=run)
