"""Benchmarks runnable from the CLI: ``kascade bench decode`` and ``kascade bench prefill``.

:mod:`kascade.bench.common` holds the shared helpers (timing, environment, results files).
"""
