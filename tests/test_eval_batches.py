"""The runner groups only samples that still miss a cell, so growing --samples fills whole batches."""

from __future__ import annotations

from kascade.eval.runner import EvalConfig, Runner, cell_key


def _runner(num_samples: int, batch_size: int, cached: set[tuple[str, int]]) -> Runner:
    r = object.__new__(Runner)  # no model: batches() needs only the config, methods and cell cache
    r.cfg = EvalConfig(model="m", tasks=("niah_single", "vt"), lengths=(1024,), num_samples=num_samples,
                       methods=("dense",), batch_size=batch_size)
    r.methods = ["dense"]
    r.plan = None
    r.cells = {}
    for task, i in cached:
        key = cell_key(r._base(r._stub(1024, task, i), "dense", None))
        r.cells[key] = {}
    return r


def test_batches_take_only_pending_samples():
    cached = {(t, i) for t in ("niah_single", "vt") for i in range(10)} | {("vt", 12)}
    got = list(_runner(30, 20, cached).batches())
    assert got[0] == [(1024, "niah_single", i) for i in range(10, 30)]
    assert got[1] == [(1024, "vt", i) for i in [10, 11] + list(range(13, 30))]
    assert len(got) == 2


def test_batches_sample_major_and_complete():
    got = list(_runner(5, 2, set()).batches())
    assert [b[0][1] for b in got] == ["niah_single", "vt"] * 3  # tasks alternate: a cut run stays balanced
    assert sorted(x for b in got for x in b) == sorted((1024, t, i) for t in ("niah_single", "vt") for i in range(5))
    assert not list(_runner(5, 2, {(t, i) for t in ("niah_single", "vt") for i in range(5)}).batches())
