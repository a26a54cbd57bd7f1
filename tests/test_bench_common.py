"""The benchmarks' shared command-line and report helpers (kascade.bench.common), on CPU: the GPU timing paths
need CUDA, their argument parsing, tables and plots do not."""

from __future__ import annotations

import pytest

from kascade.bench import prefill
from kascade.bench.common import comma_list, plot, zip_geometries


def test_comma_list_and_geometries():
    assert comma_list(int)("8192,32768,") == [8192, 32768]
    assert comma_list(float)("0.1") == [0.1] and comma_list(str)("cudnn,flash") == ["cudnn", "flash"]
    assert zip_geometries("32,16", "8,2") == [(32, 8), (16, 2)]
    assert zip_geometries("32", "8,4") == [(32, 8), (32, 4)] and zip_geometries("28,14", "4") == [(28, 4), (14, 4)]
    with pytest.raises(SystemExit, match=r"--heads \(32,16,8\) and --kv-heads \(8,2\) must zip"):
        zip_geometries("32,16,8", "8,2")


def _prefill_point(L, T, speedup):
    ms = {"layer0": 3.0, "anchor": 2.0, "reuse": 0.3}
    return {"batch": 1, "context": L, "topk_fraction": 0.1, "tile_size": T, "heads": 32, "kv_heads": 8,
            "head_dim": 128, "dtype": "bf16", "best_dense": "cudnn", "best_dense_ms": 2.5, "kascade_ms": ms,
            "ratio_to_dense": {k: v / 2.5 for k, v in ms.items()}, "model_layer_ms": 2.5 / speedup,
            "model_speedup": speedup, "tflops": {"cudnn": 600.0, "reuse": 300.0}, "check": {"ok": True}}


def test_prefill_table_and_plot(tmp_path):
    points = [_prefill_point(L, T, s) for L, T, s in ((32768, 32, 2.88), (131072, 32, 3.13), (32768, 16, 2.23))]
    table = prefill._table(points).splitlines()
    assert len(table) == 2 + len(points) and table[2].split()[:2] == ["1", "32768"]
    assert "3.13x" in table[3] and table[3].endswith("ok")
    path = plot(points, "context", ["model_speedup"], str(tmp_path / "p.png"),
                group=lambda p: f"T={p['tile_size']}", ylabel="speedup")
    assert (tmp_path / "p.png").stat().st_size > 0 and path.endswith("p.png")
    assert prefill.plot_speedup(points, str(tmp_path / "s.png")) == str(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
