"""Run methods x tasks x lengths x samples x budgets on one model; cache every finished cell.

One cell = one (task, length, sample, method, budget) greedy generation and its RULER score, written as
one JSON line to ``<out_dir>/cells.jsonl`` as soon as it finishes; a rerun skips cells already there
(resumable). Methods with dense prefill (dense and the decode-only methods) share one dense prefill per
sample: its cache is copied for each of them instead of recomputed. Methods that sparsify prefill
(Kascade, its ablations, oracle, StreamingLLM) prefill on their own.

Beside the score, each cell records the attention mass each layer's selection captured during decode
(mean over steps, heads and rows of the share of the dense softmax on the attended keys) and the mass
the oracle (each head's own exact Top-k at the same budget) would capture: a cheap, sensitive signal.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..baselines import DEFAULT_METHODS, METHODS, is_method, make_method, needs_plan
from ..baselines._common import decode_probs, expand_keep, scale_of
from ..plan import Plan
from ..budget import topk_budget
from ..decoding import decode_loop
from . import scoring, tasks as tasks_mod

# Methods whose output does not depend on the budget are run once (budget recorded as None).
BUDGET_FREE = frozenset({"dense"})


class Dispatch:
    """The one attention method installed on the model; forwards every layer call to ``self.method``
    (switched between runs) and, when probing, measures per-layer captured attention mass on decode
    steps, accumulated per method name."""

    def __init__(self, num_layers: int) -> None:
        self.method = None
        self.num_layers = num_layers
        self.probe = False
        self._acc: dict[str, list[list[float]]] = {}

    def use(self, method, probe: bool = False, fresh: bool = True) -> None:
        """Route calls to ``method``; ``fresh`` resets its state and its mass accumulators."""
        self.method = method
        self.probe = probe and hasattr(method, "last_selection")
        if self.probe:
            method.record_selection = True
        name = getattr(method, "name", "method")
        if fresh:
            if hasattr(method, "reset"):
                method.reset()
            self._acc[name] = self._empty()
        else:
            self._acc.setdefault(name, self._empty())

    def _empty(self) -> list[list]:
        # per layer: captured mass, oracle mass, decode calls, attended fraction (keys attended / valid keys)
        return [[0.0] * self.num_layers, [0.0] * self.num_layers, [0] * self.num_layers, [0.0] * self.num_layers]

    def __call__(self, layer, q, k, v, kv_start=None, kv_end=None, *, scale=None):
        out = self.method(layer, q, k, v, kv_start, kv_end, scale=scale)
        if self.probe and q.shape[2] == 1:
            self._measure(layer, q, k, kv_start, kv_end, scale)
        return out

    @torch.no_grad()
    def _measure(self, layer, q, k, kv_start, kv_end, scale):
        m = self.method
        if kv_start is None:
            kv_start = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        if kv_end is None:
            kv_end = torch.full((q.shape[0],), k.shape[2], dtype=torch.long, device=q.device)
        p = decode_probs(q, k, kv_start, kv_end, scale_of(scale, q.shape[-1]))  # [B, Hq, Lk]
        keep = m.last_selection.get(layer)
        # Accumulated as tensors: no host sync per layer and step (they are read once, in mass_report).
        if keep is None:
            mass, attended = p.new_ones(()), p.new_ones(())
        else:
            keep = expand_keep(keep, q.shape[1], k.shape[1])
            mass = (p * keep).sum(-1).mean()
            attended = (keep.sum(-1).float() / (kv_end - kv_start).clamp_min(1).to(p.device)[:, None]).mean()
        budgets = topk_budget(kv_end - kv_start, m.topk_fraction, m.topk_floor)
        # The oracle's mass: each head's own top-k of its probabilities, k = the row's budget.
        top = p.sort(dim=-1, descending=True).values.cumsum(-1)
        last = (budgets.to(torch.long).clamp(1, p.shape[-1]) - 1).view(-1, 1, 1).expand(-1, p.shape[1], 1)
        oracle = top.gather(-1, last).mean()
        acc = self._acc[getattr(m, "name", "method")]
        acc[0][layer] += mass
        acc[1][layer] += oracle
        acc[2][layer] += 1
        acc[3][layer] += attended

    def mass_report(self, name: str | None = None) -> dict | None:
        """Mean captured and oracle mass and attended-key fraction per layer of method ``name`` (default: the
        current one), over the decode steps measured."""
        name = name or getattr(self.method, "name", "method")
        acc = self._acc.get(name)
        if acc is None or not any(acc[2]):
            return None
        n = [max(1, c) for c in acc[2]]
        return {"captured_mass": [round(float(a) / c, 5) for a, c in zip(acc[0], n)],
                "oracle_mass": [round(float(a) / c, 5) for a, c in zip(acc[1], n)],
                "attended_fraction": [round(float(a) / c, 5) for a, c in zip(acc[3], n)]}


@dataclass
class EvalConfig:
    model: str = "smollm2-135m"
    tasks: Sequence[str] = tasks_mod.DEFAULT_TASKS
    lengths: Sequence[int] = (4096,)
    num_samples: int = 10
    methods: Sequence[str] = DEFAULT_METHODS
    budgets: Sequence[float] = (0.10,)
    topk_floor: int = 128
    seed: int = 0
    out_dir: str = "results/eval"
    plan: str | None = None  # path; default: the shipped plan of the model
    max_new_tokens: int | None = None  # cap on RULER's per-task generation length
    batch_size: int = 8  # samples of one task generated together (left-padded)
    probe_mass: bool = True
    chat: bool = True
    extra: dict = field(default_factory=dict)


def cell_key(c: dict) -> str:
    return "|".join(str(c.get(k)) for k in ("model", "task", "context_length", "index", "seed", "method",
                                             "topk_fraction", "topk_floor", "plan_id", "max_new_tokens"))


def load_cells(path: Path) -> dict[str, dict]:
    cells = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    c = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupted run
                    continue
                cells[cell_key(c)] = c
    return cells


def config_plan(cfg: EvalConfig, spec=None) -> tuple[Plan | None, str | None]:
    """(plan, path) the Kascade methods of ``cfg`` run with: its --plan, else the plan shipped for the model
    (kascade/plans/<name>.json), else None; checked against the model when its ``spec`` is given."""
    from .. import plans

    if cfg.plan:
        plan, path = Plan.load(cfg.plan), cfg.plan
    elif cfg.model in plans.shipped():
        plan, path = plans.load_shipped(cfg.model), str(plans.path_of(cfg.model))
    else:
        return None, None
    if spec is not None:
        plan.check_model(spec)
    return plan, path


def plan_id(plan: Plan | None) -> str | None:
    """Identity of what a plan computes (model, anchors, head map, budget, tile): its provenance is left
    out, so a plan re-saved with corrected provenance keeps its cached cells."""
    if plan is None:
        return None
    body = {k: v for k, v in plan.to_dict().items() if k != "provenance"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def greedy(model, past, first_logits, attention_mask, max_new_tokens: int, eos_ids: set[int]) -> list[list[int]]:
    """Greedy continuation of a left-padded batch from its prefilled cache and last logits. Each row
    stops at its first EOS (kept); rows that finished early ride along until all are done."""
    B = first_logits.shape[0]
    outs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B

    def take(tok) -> bool:
        for b, t in enumerate(tok.tolist()):
            if not done[b]:
                outs[b].append(t)
                done[b] = t in eos_ids
        return all(done)

    for _ in decode_loop(model, past, first_logits, steps=max_new_tokens, attention_mask=attention_mask,
                         on_token=take):
        pass
    return outs


def eos_ids_of(model, tokenizer) -> set[int]:
    ids = set()
    for v in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif v:
            ids.update(int(x) for x in v)
    for t in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        class _P:
            def update(self, n=1): ...
            def set_postfix_str(self, s): ...
            def close(self): ...
        return _P()


class Runner:
    def __init__(self, config: EvalConfig, model=None, tokenizer=None, log=print) -> None:
        self.cfg = config
        self.log = log
        if model is None:
            from .. import models

            model, tokenizer = models.load(config.model)
        self.model, self.tokenizer = model.eval(), tokenizer
        from ..integrations.hf import model_spec

        self.spec = model_spec(model)
        self.device = next(model.parameters()).device
        self.plan, self.plan_path = config_plan(config, self.spec)
        self.methods = [m for m in config.methods if is_method(m)]
        unknown = [m for m in config.methods if not is_method(m)]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; expected some of {', '.join(METHODS)}")
        if self.plan is None:
            skipped = [m for m in self.methods if needs_plan(m)]
            if skipped:
                self.log(f"no plan for {config.model}: skipping {', '.join(skipped)} (pass --plan)")
            self.methods = [m for m in self.methods if not needs_plan(m)]
        self.dispatch = Dispatch(self.spec.num_layers)
        import kascade

        kascade.enable(self.model, self.dispatch)
        self.eos = eos_ids_of(self.model, self.tokenizer)
        self.out_dir = Path(config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cells_path = self.out_dir / "cells.jsonl"
        self.cells = load_cells(self.cells_path)

    # ------------------------------------------------------------------ pieces
    def _method(self, name: str, fraction: float):
        return make_method(name, self.plan, self.spec, fraction, self.cfg.topk_floor, record_selection=self.cfg.probe_mass)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        res = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        return res.past_key_values, res.logits

    def _base(self, sample: tasks_mod.Sample, method: str, fraction: float | None) -> dict:
        return {"model": self.cfg.model, "task": sample.task, "context_length": sample.context_length,
                "index": sample.index, "seed": sample.seed, "method": method,
                "topk_fraction": fraction, "topk_floor": None if fraction is None else self.cfg.topk_floor,
                "plan_id": plan_id(self.plan) if needs_plan(method) else None,
                "max_new_tokens": self._max_new(sample)}

    def _max_new(self, sample) -> int:
        cap = self.cfg.max_new_tokens
        return sample.max_new_tokens if cap is None else min(cap, sample.max_new_tokens)

    def _finish(self, base: dict, sample, tokens: list[int], seconds: float, batch: int = 1) -> dict:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cell = dict(base, n_tokens=sample.n_tokens, answers=list(sample.answers), prediction=text,
                    score=scoring.score(text, sample.answers, sample.metric), metric=sample.metric,
                    new_tokens=len(tokens), seconds=round(seconds, 2), batch=batch)
        if sample.task == "niah_all_values":
            cell["ordered_score"] = scoring.ordered_match(text, sample.answers)
        mass = self.dispatch.mass_report()
        if mass:
            cell.update(mass)
        with open(self.cells_path, "a") as f:
            f.write(json.dumps(cell) + "\n")
        self.cells[cell_key(cell)] = cell
        return cell

    def _todo(self, sample) -> list[tuple[str, float | None]]:
        runs = []
        for name in self.methods:
            for fraction in ([None] if name in BUDGET_FREE else self.cfg.budgets):
                if cell_key(self._base(sample, name, fraction)) not in self.cells:
                    runs.append((name, fraction))
        return runs

    # ------------------------------------------------------------------ the loop
    def samples(self) -> Iterable[tuple[int, str, int]]:
        # Sample-major: an interrupted run leaves every task with about the same number of samples.
        for length in self.cfg.lengths:
            for i in range(self.cfg.num_samples):
                for task in self.cfg.tasks:
                    yield length, task, i

    def batches(self) -> Iterable[list[tuple[int, str, int]]]:
        """Groups of up to batch_size samples of one (length, task) that still miss a cell, sample-major.

        Only pending samples are grouped, so growing --samples from 10 to 30 generates samples 10-29 in
        full batches instead of re-running a batch whose first samples are cached."""
        cfg = self.cfg
        for length in cfg.lengths:
            pending = {task: [i for i in range(cfg.num_samples) if self._todo(self._stub(length, task, i))]
                       for task in cfg.tasks}
            for k in range(0, cfg.num_samples, cfg.batch_size):
                for task in cfg.tasks:
                    group = pending[task][k:k + cfg.batch_size]
                    if group:
                        yield [(length, task, i) for i in group]

    def _stub(self, length: int, task: str, index: int):
        """What a cell key needs of a sample, without generating (tokenizing) it."""
        return tasks_mod.Sample(task=task, index=index, seed=self.cfg.seed, context_length=length, n_tokens=0,
                                prompt="", answers=(), metric=tasks_mod.TASKS[task].metric,
                                max_new_tokens=tasks_mod.TASKS[task].max_new_tokens)

    @torch.no_grad()
    def run(self) -> list[dict]:
        cfg = self.cfg
        per_sample = sum(1 if m in BUDGET_FREE else len(cfg.budgets) for m in self.methods)
        total = per_sample * len(cfg.lengths) * len(cfg.tasks) * cfg.num_samples
        bar = _progress(total, f"kascade eval {cfg.model}")
        done = sum(per_sample - len(self._todo(self._stub(length, task, i))) for length, task, i in self.samples())
        bar.update(done)
        for batch in self.batches():
            samples = [tasks_mod.generate_sample(task, self.tokenizer, length, i, cfg.seed, chat=cfg.chat)
                       for length, task, i in batch]
            todo = sorted({run for s in samples for run in self._todo(s)}, key=lambda r: (self.methods.index(r[0]), r[1] or 0))
            enc = self.tokenizer([s.prompt for s in samples], add_special_tokens=False, return_tensors="pt",
                                 padding=True, padding_side="left")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            max_new = max(self._max_new(s) for s in samples)
            what = f"{samples[0].context_length} {samples[0].task}#{batch[0][2]}-{batch[-1][2]}"
            shared = [(n, f) for n, f in todo if self._shares_dense_prefill(n)]
            own = [(n, f) for n, f in todo if not self._shares_dense_prefill(n)]
            if shared:
                self.dispatch.use(make_method("dense", None, self.spec))
                t0 = time.perf_counter()
                past, logits = self._prefill(ids, mask)
                prefill_s = time.perf_counter() - t0
                for name, fraction in shared:
                    bar.set_postfix_str(f"{what} {name}@{fraction}")
                    self.dispatch.use(self._method(name, fraction or 0.1), probe=cfg.probe_mass)
                    t0 = time.perf_counter()
                    toks = greedy(self.model, copy.deepcopy(past), logits, mask, max_new, self.eos)
                    self._finish_batch(samples, name, fraction, toks, time.perf_counter() - t0 + prefill_s, bar)
                del past
            for name, fraction in own:
                bar.set_postfix_str(f"{what} {name}@{fraction}")
                self.dispatch.use(self._method(name, fraction or 0.1), probe=cfg.probe_mass)
                t0 = time.perf_counter()
                past, logits = self._prefill(ids, mask)
                toks = greedy(self.model, past, logits, mask, max_new, self.eos)
                del past
                self._finish_batch(samples, name, fraction, toks, time.perf_counter() - t0, bar)
        bar.close()
        return self.selected_cells()

    def _finish_batch(self, samples, name, fraction, toks, seconds, bar) -> None:
        for s, t in zip(samples, toks):
            base = self._base(s, name, fraction)
            if cell_key(base) in self.cells:
                continue
            self._finish(base, s, t[: self._max_new(s)], seconds / len(samples), batch=len(samples))
            bar.update(1)

    def _shares_dense_prefill(self, name: str) -> bool:
        return bool(getattr(self._method(name, 0.1), "decode_only", False))

    def selected_cells(self) -> list[dict]:
        """The cached cells this configuration asks for (the cache may hold others)."""
        return select_cells(self.cells.values(), self.cfg, self.methods, plan=plan_id(self.plan))

    def metadata(self) -> dict:
        import platform

        import transformers

        return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.cfg).items()},
                "model_spec": asdict(self.spec), "plan_path": self.plan_path, "plan_id": plan_id(self.plan),
                "anchor_layers": list(self.plan.anchor_layers) if self.plan else None,
                "methods": {m: self._method(m, 0.1).describe() for m in self.methods},
                "device": str(self.device), "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "git_commit": _git_commit()}


def select_cells(cells: Iterable[dict], cfg: EvalConfig, methods: Sequence[str] | None = None, *,
                 plan: str | None = None) -> list[dict]:
    """The cells of ``cells`` that configuration ``cfg`` asks for; ``plan`` is the plan_id the Kascade methods
    must have run with (a cache may hold cells of several plans and Top-k floors: they are never mixed)."""
    methods = list(cfg.methods if methods is None else methods)
    want = set()
    for length in cfg.lengths:
        for i in range(cfg.num_samples):
            for task in cfg.tasks:
                for name in methods:
                    for fraction in ([None] if name in BUDGET_FREE else cfg.budgets):
                        want.add((task, length, i, name, fraction))
    return [c for c in cells if c["model"] == cfg.model and c["seed"] == cfg.seed
            and (c["task"], c["context_length"], c["index"], c["method"], c["topk_fraction"]) in want
            and c.get("plan_id") == (plan if needs_plan(c["method"]) else None)
            and (c["topk_fraction"] is None or c.get("topk_floor") == cfg.topk_floor)
            and (cfg.max_new_tokens is None or c.get("max_new_tokens", 0) <= cfg.max_new_tokens)]


def _git_commit() -> str | None:
    from ..provenance import git_commit

    return git_commit()[0] or None
