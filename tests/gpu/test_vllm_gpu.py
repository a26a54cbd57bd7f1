"""The Kascade vLLM backend inside the real engine (vLLM >= 0.25.1, CUDA graphs): at Top-k 1.0 it gives
FLASH_ATTN's greedy tokens (its prefill and decode paths both run); at 10% it serves greedy and sampled
requests of different lengths. A 4-layer
Llama-3.1-8B-shape model with random weights. Skipped without CUDA or vLLM."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
vllm = pytest.importorskip("vllm")

from kascade.bench import serve  # noqa: E402
from kascade.integrations import vllm as kv  # noqa: E402


def _args(**kw):
    """`kascade bench serve`'s own arguments (its parser: no option can go missing here), small."""
    from kascade.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--layers", "4", "--context", "1000", "--steps", "8",
                                      "--backends", "CUSTOM", "--gpu-memory-utilization", "0.5"])
    return argparse.Namespace(**{**vars(args), **kw})


def test_fraction_one_equals_flash_attn():
    kv.register()
    check = serve._check(_args(), serve.SHAPES["llama-3.1-8b"]["vocab_size"])
    assert check["ok"], check


def test_serves_greedy_and_sampled_requests_of_different_lengths(monkeypatch):
    from vllm import SamplingParams

    kv.register()
    args = _args()
    d = serve._model_dir(args, 4096)
    monkeypatch.setenv(kv.PLAN_ENV, serve._plan_path(args, d))
    llm = serve._llm(d, "CUSTOM", args, 4096, 8)
    vocab = serve.SHAPES["llama-3.1-8b"]["vocab_size"]
    prompts = [serve._prompts(1, n, vocab, seed=n)[0] for n in (300, 1500, 3000)]
    greedy = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, detokenize=False))
    sampled = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=1,
                                                   ignore_eos=True, detokenize=False))
    for out in list(greedy) + list(sampled):
        assert len(out.outputs[0].token_ids) == 24
    assert kv._State.plan is not None and kv._State.indices is not None  # Kascade's decode path ran
    serve._free(llm)
