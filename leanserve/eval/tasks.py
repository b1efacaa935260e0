"""The tasks `leanserve eval` runs, each reduced to the backend's tokenize / score / generate calls,
so every backend is scored by this one code path. Prompt formats and metrics (docs/eval.md):

- ``arc_easy``, ``hellaswag`` (multiple choice, log-likelihood, lm-evaluation-harness style): each
  choice is a continuation of the item's context. ``whole = tokenize(context + continuation)``,
  ``ctx = tokenize(context)``, the scored tokens are ``whole[len(ctx):]`` (if the two tokenizations
  disagree on the boundary: ``ctx + tokenize(continuation, add_special_tokens=False)``).
  ``acc``: the choice with the highest summed log-probability is right. ``acc_norm``: the highest
  sum divided by the choice text's UTF-8 bytes (lm-eval's ``len(choice)``) is right.
- ``triviaqa`` (generation): greedy, at most 24 tokens; the answer is the first non-empty line;
  normalized exact match (SQuAD normalization) against the answer and its aliases: ``exact_match``.
  Each item also records what a cascade needs (`leanserve eval cascade`): the generated tokens'
  log-probabilities, their confidence scores (``gateway/confidence.py``) and the item's own cost.
- ``wikitext2`` (perplexity): the whole file tokenized once without special tokens, scored in rolling
  windows (`rolling_windows`): token perplexity exp(mean NLL) and bits per byte.
- a ``--task-file`` of JSONL lines of one shape: ``{"query", "choices", "gold"}`` (multiple choice),
  ``{"question", "answers"}`` (exact-match generation) or ``{"text"}`` (perplexity per document).

The data ships in ``leanserve/data/eval`` (sources and licenses in its README.md).
"""

from __future__ import annotations

import bz2
import json
import math
import random
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from leanserve.eval.backend import EvalBackend, GenerateRequest, Generation, Score, ScoreRequest
from leanserve.gateway.confidence import SCORES, answer_score

BUILTIN_TASKS = ("arc_easy", "hellaswag", "triviaqa", "wikitext2")
DEFAULT_BATCH_SIZE = 32  # items per backend call (multiple choice: all their choices in one score())
DEFAULT_CONTEXT_LENGTH = 1024  # perplexity windows: min(this, the backend's max_length)
ANSWER_MAX_TOKENS = 24
ANSWER_STOP: tuple[str, ...] = ()  # the answer is the first non-empty line (instruct models open with "\n")

Progress = Callable[[int, int], None]  # (items done, items in all)


class TaskError(ValueError):
    """Bad task input (unknown name, malformed task file, impossible windowing): one line, exit 2."""


def data_dir() -> Traversable:
    """The packaged evaluation data (``leanserve/data/eval``)."""
    return resources.files("leanserve").joinpath("data", "eval")


# ----------------------------------------------------------------------------- items and selection

@dataclass(frozen=True)
class MultipleChoiceItem:
    index: int  # position in the file: what compare matches runs by
    context: str
    choices: tuple[str, ...]  # the continuation of choice i is " " + choices[i]
    gold: int


@dataclass(frozen=True)
class GenerationItem:
    index: int
    prompt: str
    answers: tuple[str, ...]  # the reference answer first, then its aliases


@dataclass(frozen=True)
class Document:
    index: int
    text: str


@dataclass(frozen=True)
class Selection:
    """Which items run. ``limit``: N items picked by a seeded shuffle of the indices (the same N and
    seed give the same items whatever the backend, and a smaller N gives a subset of a larger one);
    ``first``: the first N in file order; neither: every item. Perplexity windows of one document
    (``wikitext2``) are always taken in order: the first N."""

    limit: int | None = None
    seed: int = 0
    first: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.first is not None:
            raise TaskError("--limit and --first exclude each other")
        for flag, value in (("--limit", self.limit), ("--first", self.first)):
            if value is not None and value < 1:
                raise TaskError(f"{flag} must be >= 1, got {value}")

    @property
    def count(self) -> int | None:
        return self.first if self.first is not None else self.limit

    def pick(self, n: int) -> list[int]:
        """The chosen indices among ``n`` items, in file order."""
        if self.first is not None:
            return list(range(min(self.first, n)))
        if self.limit is None or self.limit >= n:
            return list(range(n))
        order = list(range(n))
        random.Random(self.seed).shuffle(order)
        return sorted(order[:self.limit])

    def describe(self, n_available: int, in_order: bool = False) -> dict[str, Any]:
        n = self.count
        if n is None or n >= n_available:
            method = "all"
        elif self.first is not None or in_order:
            method = "first"
        else:
            method = "seeded_shuffle"
        return {"method": method, "limit": self.limit, "first": self.first,
                "seed": self.seed if method == "seeded_shuffle" else None}


@dataclass(frozen=True)
class EvalOptions:
    selection: Selection = field(default_factory=Selection)
    batch_size: int = DEFAULT_BATCH_SIZE
    context_length: int | None = None  # perplexity windows (default: min(1024, backend.max_length))
    stride: int | None = None  # new tokens per window (default: context_length - 1)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise TaskError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.context_length is not None and self.context_length < 2:
            raise TaskError(f"--context-length must be >= 2 (one token of context, one scored), got {self.context_length}")
        if self.stride is not None and self.stride < 1:
            raise TaskError(f"--stride must be >= 1, got {self.stride}")
        if self.stride is not None and self.context_length is not None:
            check_windowing(self.context_length, self.stride)


@dataclass
class TaskOutcome:
    """What one task measured: its metrics, how many items, which, and one record per item."""

    metrics: dict[str, float]
    num_items: int
    num_items_available: int
    selection: dict[str, Any]
    details: dict[str, Any]
    items: list[dict[str, Any]]


def _batches(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def _scored(backend: EvalBackend, requests: list[ScoreRequest]) -> list[Score]:
    scores = backend.score(requests)
    if len(scores) != len(requests):
        raise RuntimeError(f"the backend answered {len(scores)} scores for {len(requests)} requests")
    for req, s in zip(requests, scores):
        if len(s.logprobs) != len(req.token_ids) - req.start:
            raise RuntimeError(f"the backend returned {len(s.logprobs)} logprobs for "
                               f"{len(req.token_ids) - req.start} scored tokens")
    return scores


class Task(ABC):
    """One task: where its items come from, how they are put to the backend, what is measured."""

    kind: str  # multiple_choice | generation | perplexity
    main_metric: str
    higher_is_better: bool = True

    def __init__(self, name: str, prompt_format: str, source: str) -> None:
        self.name = name
        self.prompt_format = prompt_format
        self.source = source  # "leanserve/data/eval/<file>" or the task file's path

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "main_metric": self.main_metric, "higher_is_better": self.higher_is_better,
                "prompt_format": self.prompt_format, "source": self.source}

    @abstractmethod
    def num_available(self) -> int: ...

    @abstractmethod
    def run(self, backend: EvalBackend, options: EvalOptions, progress: Progress | None = None) -> TaskOutcome: ...


# ----------------------------------------------------------------------------- multiple choice

def continuation_request(backend: EvalBackend, context: str, continuation: str, ctx_ids: list[int]) -> ScoreRequest:
    """Context + continuation as lm-eval tokenizes them: the continuation's tokens are those of
    ``tokenize(context + continuation)`` past ``tokenize(context)``; if the two disagree on the
    boundary, the context's tokens then the continuation tokenized alone. Longer than the model's
    context: the context is cut from the left."""
    whole = backend.tokenize(context + continuation)
    n = len(ctx_ids)
    if len(whole) > n and whole[:n] == ctx_ids:
        cont = whole[n:]
    else:
        cont = backend.tokenize(continuation, add_special_tokens=False)
    if not cont:
        raise TaskError(f"the continuation {continuation!r} gives no tokens")
    ids = (ctx_ids + cont)[-backend.max_length:]
    start = len(ids) - len(cont)
    if start < 1:
        raise TaskError(f"no context token before the continuation {continuation[:40]!r} "
                        f"(empty context, or a continuation as long as the model's context)")
    return ScoreRequest(tuple(ids), start)


def judge(item: MultipleChoiceItem, sums: Sequence[float], counts: Sequence[int]) -> dict[str, Any]:
    """acc: argmax of the summed logprobs; acc_norm: argmax of sum / UTF-8 bytes of the choice text
    (lm-eval divides by ``len(choice)``, the choice without its leading space). Ties: the first."""
    norms = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(sums, item.choices)]
    chosen = max(range(len(sums)), key=lambda i: sums[i])
    chosen_norm = max(range(len(norms)), key=lambda i: norms[i])
    return {"index": item.index, "gold": item.gold, "chosen": chosen, "chosen_norm": chosen_norm,
            "correct": chosen == item.gold, "correct_norm": chosen_norm == item.gold,
            "logprobs": [float(s) for s in sums], "tokens": list(counts)}


def group_by_context(items: Sequence[MultipleChoiceItem]) -> list[MultipleChoiceItem]:
    """Items sharing a context next to each other (first appearance order), so the backend's prefix
    cache computes each context once."""
    groups: dict[str, list[MultipleChoiceItem]] = {}
    for item in items:
        groups.setdefault(item.context, []).append(item)
    return [item for group in groups.values() for item in group]


class _LoadedItems(Task):
    """A task over a list of items loaded once, on first use."""

    _load: Callable[[], list[Any]]
    _items: list[Any] | None

    def items(self) -> list[Any]:
        if self._items is None:
            self._items = self._load()
        return self._items

    def num_available(self) -> int:
        return len(self.items())


class MultipleChoiceTask(_LoadedItems):
    kind = "multiple_choice"
    main_metric = "acc_norm"

    def __init__(self, name: str, load: Callable[[], list[MultipleChoiceItem]], prompt_format: str, source: str) -> None:
        super().__init__(name, prompt_format, source)
        self._load = load
        self._items: list[MultipleChoiceItem] | None = None

    def run(self, backend: EvalBackend, options: EvalOptions, progress: Progress | None = None) -> TaskOutcome:
        items = self.items()
        picked = options.selection.pick(len(items))
        ordered = group_by_context([items[i] for i in picked])
        records: dict[int, dict[str, Any]] = {}
        done = 0
        for batch in _batches(ordered, options.batch_size):
            requests: list[ScoreRequest] = []
            ctx_ids: dict[str, list[int]] = {}
            for item in batch:
                if item.context not in ctx_ids:
                    ctx_ids[item.context] = backend.tokenize(item.context)
                for choice in item.choices:
                    try:
                        requests.append(continuation_request(backend, item.context, " " + choice, ctx_ids[item.context]))
                    except TaskError as e:
                        raise TaskError(f"{self.name} item {item.index}: {e}") from None
            scores = _scored(backend, requests)
            k = 0
            for item in batch:
                mine = scores[k:k + len(item.choices)]
                k += len(item.choices)
                records[item.index] = judge(item, [s.total for s in mine], [len(s.logprobs) for s in mine])
            done += len(batch)
            if progress:
                progress(done, len(ordered))
        out = [records[i] for i in picked]
        n = len(out)
        metrics = {"acc": sum(r["correct"] for r in out) / n if n else math.nan,
                   "acc_norm": sum(r["correct_norm"] for r in out) / n if n else math.nan}
        details = {"choices_scored": sum(len(r["tokens"]) for r in out),
                   "continuation_tokens": sum(sum(r["tokens"]) for r in out)}
        return TaskOutcome(metrics, n, len(items), options.selection.describe(len(items)), details, out)


def arc_context(query: str) -> str:
    """lm-eval's ARC prompt ``"Question: {question}\\nAnswer:"``. The packaged file's ``query``
    already starts with ``"Question: "``, so it is kept as it is and only ``"\\nAnswer:"`` is added
    (nothing is added to a part the query already holds)."""
    context = query if query.startswith("Question:") else f"Question: {query}"
    return context if context.rstrip().endswith("Answer:") else context + "\nAnswer:"


def _jsonl_rows(text: str, where: str) -> list[tuple[int, Any]]:
    rows = []
    # split on newlines only: str.splitlines also splits on U+2028 and friends, which JSON strings may hold
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return rows


def load_arc_easy(text: str | None = None) -> list[MultipleChoiceItem]:
    where = "arc_easy_test.jsonl"
    text = data_dir().joinpath(where).read_text(encoding="utf-8") if text is None else text
    items = []
    for i, (lineno, row) in enumerate(_jsonl_rows(text, where)):
        try:
            items.append(MultipleChoiceItem(i, arc_context(row["query"]), tuple(row["choices"]), int(row["gold"])))
        except (KeyError, TypeError, ValueError) as e:
            raise TaskError(f"{where}:{lineno}: expected query, choices, gold ({e})") from None
    return items


_BRACKETS = re.compile(r"\[.*?\]")


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: strip, WikiHow's " [title]" -> ". ", other [tags] dropped,
    double spaces collapsed (once, as lm-eval does)."""
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETS.sub("", text)
    return text.replace("  ", " ")


def parse_hellaswag(text: str, where: str = "hellaswag_val.txt") -> list[MultipleChoiceItem]:
    """6 lines per item: ``label: context``, the gold index (0-3), the 4 endings. The context is the
    whole first line (lm-eval's ``activity_label + ": " + ctx``), preprocessed; so are the endings."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or len(lines) % 6:
        raise TaskError(f"{where}: {len(lines)} lines, expected 6 per item (label: context, gold, 4 endings)")
    items = []
    for k in range(0, len(lines), 6):
        head, gold, endings = lines[k], lines[k + 1].strip(), lines[k + 2:k + 6]
        if ": " not in head:
            raise TaskError(f"{where}:{k + 1}: expected 'label: context', got {head[:60]!r}")
        if gold not in ("0", "1", "2", "3"):
            raise TaskError(f"{where}:{k + 2}: expected the gold index 0-3, got {gold[:20]!r}")
        items.append(MultipleChoiceItem(k // 6, hellaswag_preprocess(head),
                                        tuple(hellaswag_preprocess(e) for e in endings), int(gold)))
    return items


def load_hellaswag() -> list[MultipleChoiceItem]:
    raw = data_dir().joinpath("hellaswag_val.txt.bz2").read_bytes()
    return parse_hellaswag(bz2.decompress(raw).decode("utf-8"))


# ----------------------------------------------------------------------------- generation

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, punctuation dropped, articles (a, an, the) dropped,
    whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_line(text: str) -> str:
    """The answer in a generation: its first non-empty line, stripped. ("." ends no answer: "St. Louis",
    "J.R.R. Tolkien"; and a model that opens with a newline, as chat-tuned ones do, still answers.)"""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """The normalized prediction equals a normalized answer (answers that normalize to nothing, such
    as "The", never match)."""
    pred = normalize_answer(prediction)
    return any(pred == a for a in map(normalize_answer, answers) if a)


class GenerationTask(_LoadedItems):
    kind = "generation"
    main_metric = "exact_match"

    def __init__(self, name: str, load: Callable[[], list[GenerationItem]], prompt_format: str, source: str,
                 max_tokens: int = ANSWER_MAX_TOKENS, stop: tuple[str, ...] = ANSWER_STOP) -> None:
        super().__init__(name, prompt_format, source)
        self._load = load
        self._items: list[GenerationItem] | None = None
        self.max_tokens = max_tokens
        self.stop = stop

    def run(self, backend: EvalBackend, options: EvalOptions, progress: Progress | None = None) -> TaskOutcome:
        items = self.items()
        picked = [items[i] for i in options.selection.pick(len(items))]
        out: list[dict[str, Any]] = []
        for batch in _batches(picked, options.batch_size):
            gens = backend.generate([GenerateRequest(it.prompt, self.max_tokens, self.stop) for it in batch])
            if len(gens) != len(batch):
                raise RuntimeError(f"the backend answered {len(gens)} generations for {len(batch)} requests")
            for it, gen in zip(batch, gens):
                out.append(generation_record(it, gen))
            if progress:
                progress(len(out), len(picked))
        n = len(out)
        metrics = {"exact_match": sum(r["correct"] for r in out) / n if n else math.nan}
        details = {"max_tokens": self.max_tokens, "stop": list(self.stop)}
        return TaskOutcome(metrics, n, len(items), options.selection.describe(len(items)), details, out)


def generation_record(item: GenerationItem, gen: Generation) -> dict[str, Any]:
    """One answered item: the answer and whether it matched, then what a cascade simulation needs:
    the log-probability of every generated token (the whole completion as a server returns it, the
    end-of-sequence token included when one ended it), each confidence score of them (-inf for no
    tokens or an empty text, written as null), and what this item alone cost."""
    answer = first_line(gen.text)
    return {"index": item.index, "prediction": answer, "generated": gen.text, "answer": item.answers[0],
            "correct": exact_match(answer, item.answers), "token_logprobs": list(gen.token_logprobs),
            "scores": {name: answer_score(name, gen.text, gen.token_logprobs) for name in SCORES},
            "cost_usd": gen.usd, "machine_seconds": gen.machine_seconds}


def qa_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def load_triviaqa() -> list[GenerationItem]:
    """The packaged file's ``context`` is already ``"Question: {question}\\nAnswer:"``: used as it is."""
    where = "triviaqa_sub.jsonl"
    items = []
    for i, (lineno, row) in enumerate(_jsonl_rows(data_dir().joinpath(where).read_text(encoding="utf-8"), where)):
        try:
            prompt = row["context"]
            prompt = prompt if prompt.startswith("Question:") else qa_prompt(prompt)
            answers = tuple(dict.fromkeys([row["answer"], *row["aliases"]]))
        except (KeyError, TypeError) as e:
            raise TaskError(f"{where}:{lineno}: expected context, answer, aliases ({e})") from None
        items.append(GenerationItem(i, prompt, answers))
    return items


# ----------------------------------------------------------------------------- perplexity

@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go to the model; tokens [score_from, end) are scored, each given the
    window's tokens before it."""

    begin: int
    end: int
    score_from: int


def check_windowing(context_length: int, stride: int) -> None:
    if context_length < 2:
        raise TaskError(f"--context-length must be >= 2, got {context_length}")
    if not 1 <= stride < context_length:
        raise TaskError(f"--stride must be between 1 and --context-length - 1 ({context_length - 1}), got {stride}: "
                        "a window's first token has no context, so each window needs one token from the one before")


def rolling_windows(num_tokens: int, context_length: int, stride: int) -> list[Window]:
    """HF's "Perplexity of fixed-length models" loop: windows of ``context_length`` tokens starting
    every ``stride`` tokens; each scores only the tokens no earlier window scored. Token 0 is never
    scored (nothing precedes it); with ``stride < context_length`` every other token is scored
    exactly once, so the windows score ``num_tokens - 1`` tokens in all. ``stride = context_length - 1``
    (the default) gives windows that share one token: the fewest windows that still score every token.

        tokens      0 1 2 3 4 5 6 7 8 9          context_length 4, stride 3
        window 0    [ . s s s ]                  scores 1-3
        window 1          [ . s s s ]            scores 4-6 given 3 (and 3-5 before each)
        window 2                [ . s s s ]      scores 7-9
    """
    check_windowing(context_length, stride)
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            windows.append(Window(begin, end, score_from))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def token_char_offset(backend: EvalBackend, text: str, ids: Sequence[int], k: int) -> int | None:
    """Where token ``k`` of ``ids = tokenize(text)`` starts in ``text``: the ``c`` with
    ``tokenize(text[:c]) == ids[:k]`` (unique for a lossless tokenizer). Searched by doubling then
    bisecting ``c`` on whether ``tokenize(text[:c])`` starts with ``ids[:k]``, so it costs a few
    tokenizations of at most twice the prefix. None when no prefix tokenizes so."""
    if k <= 0:
        return 0
    if k >= len(ids):
        return len(text)
    target = list(ids[:k])

    def covers(c: int) -> bool:
        return backend.tokenize(text[:c], add_special_tokens=False)[:k] == target

    lo, hi = 0, min(16, len(text))
    while hi < len(text) and not covers(hi):
        lo, hi = hi + 1, min(2 * hi, len(text))
    while lo < hi:  # the smallest c that covers ids[:k]
        mid = (lo + hi) // 2
        if covers(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo if backend.tokenize(text[:lo], add_special_tokens=False) == target else None


def scored_bytes(backend: EvalBackend, text: str, ids: Sequence[int], first: int, end: int) -> tuple[int, bool]:
    """UTF-8 bytes of the text of tokens [first, end), and whether they were found exactly (else
    estimated from the token share of the text)."""
    a = token_char_offset(backend, text, ids, first)
    b = token_char_offset(backend, text, ids, end)
    if a is None or b is None:
        total = len(text.encode("utf-8"))
        return round(total * (end - first) / max(1, len(ids))), False
    return len(text[a:b].encode("utf-8")), True


class PerplexityTask(Task):
    """Perplexity over documents, each tokenized once without special tokens and scored in rolling
    windows. ``windows_are_items``: one long document whose windows are the items (``wikitext2``:
    ``--limit N`` takes the first N windows); else each document is an item."""

    kind = "perplexity"
    main_metric = "bits_per_byte"
    higher_is_better = False

    def __init__(self, name: str, load: Callable[[], list[Document]], prompt_format: str, source: str,
                 windows_are_items: bool = False) -> None:
        super().__init__(name, prompt_format, source)
        self._load = load
        self._docs: list[Document] | None = None
        self.windows_are_items = windows_are_items

    def documents(self) -> list[Document]:
        if self._docs is None:
            self._docs = self._load()
        return self._docs

    def num_available(self) -> int:
        return len(self.documents())

    def windowing(self, backend: EvalBackend, options: EvalOptions) -> tuple[int, int]:
        length = options.context_length or min(DEFAULT_CONTEXT_LENGTH, backend.max_length)
        if length > backend.max_length:
            raise TaskError(f"--context-length {length} is more than the model's context ({backend.max_length})")
        stride = options.stride or length - 1
        check_windowing(length, stride)
        return length, stride

    def run(self, backend: EvalBackend, options: EvalOptions, progress: Progress | None = None) -> TaskOutcome:
        length, stride = self.windowing(backend, options)
        docs = self.documents()
        if self.windows_are_items:
            picked_docs = docs[:1]
        else:
            picked_docs = [docs[i] for i in options.selection.pick(len(docs))]
        # (document, its ids, its windows): every window of every picked document, in order
        plan = []
        for doc in picked_docs:
            ids = backend.tokenize(doc.text, add_special_tokens=False)
            plan.append((doc, ids, rolling_windows(len(ids), length, stride)))
        n_windows_available = len(plan[0][2]) if self.windows_are_items and plan else 0
        if self.windows_are_items and plan and options.selection.count is not None:
            doc, ids, wins = plan[0]
            plan[0] = (doc, ids, wins[:options.selection.count])
        jobs = [(d, ids, w) for d, ids, wins in plan for w in wins]
        nll: list[float] = []
        total = len(jobs)
        for batch in _batches(jobs, options.batch_size):
            requests = [ScoreRequest(tuple(ids[w.begin:w.end]), w.score_from - w.begin) for _, ids, w in batch]
            nll.extend(-s.total for s in _scored(backend, requests))
            if progress:
                progress(len(nll), total)

        records: list[dict[str, Any]] = []
        total_nll, total_tokens, total_bytes, exact = 0.0, 0, 0, True
        k = 0
        for doc, ids, wins in plan:
            doc_nll, doc_tokens = 0.0, 0
            for w in wins:
                tokens = w.end - w.score_from
                if self.windows_are_items:
                    records.append({"index": len(records), "begin": w.begin, "end": w.end, "score_from": w.score_from,
                                    "tokens": tokens, "nll": nll[k]})
                doc_nll += nll[k]
                doc_tokens += tokens
                k += 1
            doc_bytes = 0
            if wins:
                doc_bytes, ok = scored_bytes(backend, doc.text, ids, wins[0].score_from, wins[-1].end)
                exact = exact and ok
            if not self.windows_are_items:
                records.append({"index": doc.index, "tokens": doc_tokens, "nll": doc_nll, "bytes": doc_bytes,
                                "tokens_total": len(ids)})
            total_nll += doc_nll
            total_tokens += doc_tokens
            total_bytes += doc_bytes

        metrics = {"perplexity": math.exp(total_nll / total_tokens) if total_tokens else math.nan,
                   "bits_per_byte": total_nll / math.log(2) / total_bytes if total_bytes else math.nan}
        details = {"context_length": length, "stride": stride, "windows": len(jobs),
                   "tokens_total": sum(len(ids) for _, ids, _ in plan), "tokens_scored": total_tokens,
                   "bytes_scored": total_bytes, "bytes_exact": exact, "nll_sum": total_nll,
                   "documents": len(plan)}
        if self.windows_are_items:
            selection = options.selection.describe(n_windows_available, in_order=True)
            return TaskOutcome(metrics, len(records), n_windows_available, selection, details, records)
        return TaskOutcome(metrics, len(records), len(docs), options.selection.describe(len(docs)), details, records)


def load_wikitext2() -> list[Document]:
    raw = data_dir().joinpath("wikitext2_test.raw").read_bytes()
    return [Document(0, raw.decode("utf-8"))]


# ----------------------------------------------------------------------------- task files

SHAPES = {
    "multiple_choice": ("query", "choices", "gold"),
    "generation": ("question", "answers"),
    "perplexity": ("text",),
}
SHAPES_HELP = ('{"query": str, "choices": [str, ...], "gold": int}, {"question": str, "answers": [str, ...]} '
               'or {"text": str}')


def _item_of(shape: str, row: dict[str, Any], index: int) -> MultipleChoiceItem | GenerationItem | Document:
    """The item a task-file line describes; TaskError (without the place) when a field is wrong."""
    def text(key: str) -> str:
        v = row[key]
        if not isinstance(v, str) or not v.strip():
            raise TaskError(f"{key!r} must be a non-empty string")
        return v

    def texts(key: str, at_least: int) -> tuple[str, ...]:
        v = row[key]
        if not isinstance(v, list) or len(v) < at_least or not all(isinstance(x, str) and x.strip() for x in v):
            raise TaskError(f"{key!r} must be a list of at least {at_least} non-empty strings")
        return tuple(v)

    if shape == "multiple_choice":
        choices = texts("choices", 2)
        gold = row["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise TaskError(f"'gold' must be a whole number from 0 to {len(choices) - 1} (an index into 'choices'), "
                            f"got {json.dumps(gold)}")
        return MultipleChoiceItem(index, text("query"), choices, gold)
    if shape == "generation":
        return GenerationItem(index, qa_prompt(text("question")), texts("answers", 1))
    return Document(index, text("text"))


def parse_task_file(text: str, where: str) -> tuple[str, list[Any]]:
    """(shape, items) of a task file's text; TaskError naming ``where`` and the line otherwise."""
    shape: str | None = None
    first_line = 0
    items: list[Any] = []
    for lineno, row in _jsonl_rows(text, where):
        if not isinstance(row, dict):
            raise TaskError(f"{where}:{lineno}: expected a JSON object, one of {SHAPES_HELP}")
        matches = [s for s, keys in SHAPES.items() if any(k in row for k in keys)]
        if not matches:
            raise TaskError(f"{where}:{lineno}: no known fields ({', '.join(sorted(row)) or 'empty object'}); "
                            f"expected one of {SHAPES_HELP}")
        if len(matches) > 1:
            raise TaskError(f"{where}:{lineno}: mixes the fields of several shapes ({', '.join(matches)}); "
                            f"expected one of {SHAPES_HELP}")
        this = matches[0]
        missing = [k for k in SHAPES[this] if k not in row]
        if missing:
            raise TaskError(f"{where}:{lineno}: a {this} line needs {', '.join(SHAPES[this])}; "
                            f"missing {', '.join(missing)}")
        if shape is None:
            shape, first_line = this, lineno
        elif this != shape:
            raise TaskError(f"{where}:{lineno}: a {this} line, but line {first_line} is {shape}: "
                            "a task file holds one shape")
        try:
            items.append(_item_of(this, row, len(items)))
        except TaskError as e:
            raise TaskError(f"{where}:{lineno}: {e}") from None
    if shape is None:
        raise TaskError(f"{where}: no items; expected JSONL lines of one shape: {SHAPES_HELP}")
    return shape, items


def load_task_file(path: Path) -> Task:
    """A task from a JSONL file, named by the file's stem; read and checked now."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskError(f"task file {where} not found") from None
    except UnicodeDecodeError as e:
        raise TaskError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise TaskError(f"cannot read task file {where}: {e.strerror or e}") from None
    shape, items = parse_task_file(text, where)
    name = path.stem
    if shape == "multiple_choice":
        return MultipleChoiceTask(name, lambda: items, 'context: the query verbatim; continuations: " " + choice', where)
    if shape == "generation":
        return GenerationTask(name, lambda: items, 'prompt: "Question: {question}\\nAnswer:"; greedy, at most '
                              f'{ANSWER_MAX_TOKENS} tokens, the first non-empty line; exact match against answers', where)
    return PerplexityTask(name, lambda: items, "each text its own document, tokenized without special tokens, "
                          "rolling windows", where)


# ----------------------------------------------------------------------------- the built-in tasks

def builtin_task(name: str) -> Task:
    """A built-in task by name; TaskError listing the known ones otherwise."""
    data = "leanserve/data/eval/"
    if name == "arc_easy":
        return MultipleChoiceTask(name, load_arc_easy, 'context: "Question: {question}\\nAnswer:" (the file\'s query '
                                  'already holds "Question: "); continuations: " {choice}"', data + "arc_easy_test.jsonl")
    if name == "hellaswag":
        return MultipleChoiceTask(name, load_hellaswag, 'context: "{activity label}: {context}"; continuations: '
                                  '" {ending}" (lm-eval preprocessing)', data + "hellaswag_val.txt.bz2")
    if name == "triviaqa":
        return GenerationTask(name, load_triviaqa, 'prompt: "Question: {question}\\nAnswer:"; greedy, at most '
                              f'{ANSWER_MAX_TOKENS} tokens, stop at a newline; exact match against answer and aliases',
                              data + "triviaqa_sub.jsonl")
    if name == "wikitext2":
        return PerplexityTask(name, load_wikitext2, "the whole file tokenized once without special tokens; rolling "
                              "windows", data + "wikitext2_test.raw", windows_are_items=True)
    raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(BUILTIN_TASKS)} (or --task-file PATH.jsonl)")


def resolve_tasks(names: Sequence[str], task_files: Sequence[Path] = ()) -> list[Task]:
    """The built-in tasks by name, then the task files; each name once."""
    tasks = [builtin_task(n) for n in names] + [load_task_file(Path(p)) for p in task_files]
    seen: set[str] = set()
    for t in tasks:
        if t.name in seen:
            raise TaskError(f"task {t.name!r} given twice (a task file is named by its stem)")
        seen.add(t.name)
    if not tasks:
        raise TaskError(f"no task: give --tasks (known: {', '.join(BUILTIN_TASKS)}) and/or --task-file PATH.jsonl")
    return tasks
