"""Shared benchmark helpers: timing, the environment record, results files, tables and plots.

API (kept small on purpose):

* ``bench_ms(fn, *, use_graph=True, flush_l2=True, budget_ms=300, min_reps=10, max_reps=200) -> float``:
  median milliseconds of ``fn()`` on the current CUDA device. fn is called once first (compilation,
  warm-up), then, with use_graph, captured in a CUDA graph whose replays are timed (no launch gaps from
  Python; the ops must be capturable). Each repetition is timed alone with CUDA events, after a 256 MB
  read that evicts the L2, so repeated runs never read a warm cache. A read, not a write (as
  triton.testing.do_bench does): a write leaves up to 50 MB of dirty lines whose write-back would be
  charged to the timed kernel, which for a 50 MB sparse gather doubles its traffic.
* ``env_info() -> dict``: device name, torch / triton / CUDA / cuDNN versions, git commit, UTC time.
* ``write_results(path, rows, meta) -> str``: one JSON document {"meta": meta, "rows": rows}; returns path.
* ``format_table(rows, columns) -> str`` / ``print_table(rows, columns)``: columns are (header, key or
  callable, format) triples.
* ``plot(rows, x, ys, path, *, group=None, ylabel=None)``: optional PNG (needs matplotlib).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from ..provenance import git_commit

_FLUSH: dict[int, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _FLUSH:
        _FLUSH[idx] = torch.ones(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    return _FLUSH[idx]


def bench_ms(
    fn: Callable[[], Any],
    *,
    use_graph: bool = True,
    flush_l2: bool = True,
    budget_ms: float = 300.0,
    min_reps: int = 10,
    max_reps: int = 200,
) -> float:
    """Median time of fn() in milliseconds (see the module docstring)."""
    device = torch.device("cuda", torch.cuda.current_device())
    fn()
    torch.cuda.synchronize()
    run = fn
    if use_graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    flush = _flush_buffer(device) if flush_l2 else None
    # a first estimate decides the repetition count
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        run()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    reps = int(min(max_reps, max(min_reps, budget_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush is not None:
            torch.amax(flush)
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    if use_graph:
        del graph
    return float(statistics.median(times))


def env_info() -> dict:
    """Where and with what a result was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = git_commit()
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def comma_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """Parser of a command-line comma list: comma_list(int)("8192,32768") == [8192, 32768]."""
    return lambda s: [kind(x) for x in str(s).split(",") if x]


def zip_geometries(heads: str, kv_heads: str) -> list[tuple[int, int]]:
    """(query heads, KV heads) pairs of --heads and --kv-heads, zipped: equal lengths, or one of them a single
    value (``"32,16"`` with ``"8,2"`` is 32/8 and 16/2)."""
    hq, hkv = comma_list(int)(heads), comma_list(int)(kv_heads)
    if len(hq) == 1:
        hq = hq * len(hkv)
    if len(hkv) == 1:
        hkv = hkv * len(hq)
    if len(hq) != len(hkv):
        raise SystemExit(f"--heads ({heads}) and --kv-heads ({kv_heads}) must zip: equal lengths or one value")
    return list(zip(hq, hkv))


def write_results(path: str, rows: list[dict], meta: dict) -> str:
    """Write {"meta": meta, "rows": rows} as JSON to path (folders created). Returns path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
        f.write("\n")
    return path


Column = tuple[str, "str | Callable[[dict], Any]", str]


def format_table(rows: Iterable[dict], columns: Sequence[Column]) -> str:
    """A fixed-width text table; a cell whose value is None prints '-'."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, fmt in columns:
            value = key(row) if callable(key) else row.get(key)
            line.append("-" if value is None else format(value, fmt))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = [" ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def print_table(rows: Iterable[dict], columns: Sequence[Column]) -> None:
    print(format_table(rows, columns), flush=True)


def plot(rows: list[dict], x: str, ys: Sequence[str], path: str, *, group: Callable[[dict], str] | None = None,
         ylabel: str | None = None) -> str:
    """Lines of each key in ys against x (log2 axis), one line per group label. Returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = sorted({group(r) if group else "" for r in rows})
    for label in labels:
        pts = sorted((r[x], r) for r in rows if (group(r) if group else "") == label)
        for y in ys:
            ax.plot([p[0] for p in pts], [p[1][y] for p in pts], marker="o", label=f"{label} {y}".strip())
    ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or ", ".join(ys))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
