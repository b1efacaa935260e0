"""Workloads: what the benchmark sends. Pure data and a seeded RNG; no HTTP here.

A workload is a sequence of :class:`Conversation`. Most have one user turn; ``multi-turn`` has two,
and the client builds the second request at run time from the first turn plus the server's actual
answer (that re-sent history is what prefix caching can reuse). The input-grounded workloads
(``spec-bench``, ``rag``, ``code-edit``, ``summarize``) ask for answers that re-use the prompt's own
text, which is where speculative decoding pays.

The client has no tokenizer, so input lengths are approximations (see :func:`approx_tokens`):
the server's ``usage.prompt_tokens``, when it reports one, is what the metrics use.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Callable, Iterator

GROUNDED_WORKLOADS = ("spec-bench", "rag", "code-edit", "summarize")
WORKLOADS = ("chat", "multi-turn", "shared-prefix", "random", "sharegpt", *GROUNDED_WORKLOADS)
QUESTIONS_FILE = "mt_bench_questions.jsonl"
REFERENCE_FILE = "mt_bench_reference_answers.jsonl"
# The input-grounded workloads' files ship in leanserve/data/bench (source and license in its README.md).
BENCH_SUBFOLDER = "bench"
SPECBENCH_FILE = "specbench_questions.jsonl"
HUMANEVALFIX_FILE = "humanevalfix_python.jsonl"
SCITLDR_FILE = "scitldr_a_test.jsonl"
CODE_EDIT_INSTRUCTION = "Fix the bug in the following Python function. Reply with the whole corrected function only."
SUMMARIZE_INSTRUCTION = "Summarize this abstract in one sentence."
CHARS_PER_TOKEN = 4.0  # the usual rule of thumb for English text with BPE tokenizers
DEFAULT_CHAT_OUTPUT_LEN = 128
DEFAULT_RANDOM_RANGE = (100, 1024)  # the nano-vllm convention, for both input and output lengths
DEFAULT_SHARED_PREFIX_TOKENS = 1500
SHORT_MESSAGE_TOKENS = 150  # shared-prefix: user messages at most this long (~tokens)

# Short, common English words: each is one token (with its leading space) in the GPT-2/Llama/SmolLM
# BPE vocabularies, so N of them make roughly N tokens. Built in so `random` needs no data files.
_RANDOM_WORDS = (
    "the of and to in is was for on that with as by at from his her it an are were which be this has had "
    "not but also its one their they or have new first two more after who when time all been there into "
    "other would some most year city than only over these may many them then she such used while during "
    "about three years later between both under state where school well made being before world through "
    "part known because each day since four people high work same including water three film line game "
    "team north south east west area house life held long song early country end second back around group "
    "number name family several large small major best music general public left right home make war "
    "power main good old great national local until three still without even way side like form set "
    "land team point order system data model light open free road book sea river club show case test "
    "play top low red blue green black white gold king queen art law army air fire rock star ship car"
).split()
_RANDOM_WORDS = tuple(dict.fromkeys(_RANDOM_WORDS))


class WorkloadError(ValueError):
    """Bad workload input (missing data file, malformed dataset, bad length range)."""


@dataclass
class Conversation:
    """One unit of work: ``turns`` user messages sent in order, each after the previous answer."""

    conversation_id: int
    turns: list[str]
    system: str | None = None
    output_lens: list[int | None] = field(default_factory=list)  # max_tokens per turn; None: server default
    approx_input_tokens: list[int] = field(default_factory=list)  # per turn, for the first request of each
    source_id: str = ""  # e.g. the MT-Bench question_id

    def __post_init__(self) -> None:
        if not self.output_lens:
            self.output_lens = [None] * len(self.turns)
        if not self.approx_input_tokens:
            sys_tokens = approx_tokens(self.system or "")
            self.approx_input_tokens = [sys_tokens + approx_tokens(t) for t in self.turns]


@dataclass(frozen=True)
class WorkloadSpec:
    name: str = "chat"
    data_dir: Path | None = None
    dataset_path: Path | None = None
    seed: int = 0
    output_len: int | None = None
    output_len_range: tuple[int, int] | None = None
    input_len: int | None = None  # random workload only
    input_len_range: tuple[int, int] | None = None  # random workload only
    shared_prefix_tokens: int = DEFAULT_SHARED_PREFIX_TOKENS

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise WorkloadError(f"unknown workload {self.name!r}; choose from {', '.join(WORKLOADS)}")
        for label, rng in (("output length range", self.output_len_range), ("input length range", self.input_len_range)):
            if rng is not None and not (1 <= rng[0] <= rng[1]):
                raise WorkloadError(f"{label} must be LO:HI with 1 <= LO <= HI, got {rng[0]}:{rng[1]}")
        for label, n in (("output length", self.output_len), ("input length", self.input_len)):
            if n is not None and n < 1:
                raise WorkloadError(f"{label} must be >= 1, got {n}")
        if self.shared_prefix_tokens < 1:
            raise WorkloadError(f"shared prefix length must be >= 1, got {self.shared_prefix_tokens}")
        if self.name == "sharegpt" and self.dataset_path is None:
            raise WorkloadError("the sharegpt workload needs --dataset-path FILE")


def approx_tokens(text: str) -> int:
    """Token count estimate without a tokenizer: ceil(characters / 4), the usual English rule of thumb."""
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def packaged_data() -> Traversable:
    """The package's own data folder (``leanserve/data``): the MT-Bench files ship inside the package
    (source and license in its README.md), so the default workloads need nothing beside it."""
    return resources.files("leanserve").joinpath("data")


def needs_data_dir(name: str) -> bool:
    return name in ("chat", "multi-turn", "shared-prefix", *GROUNDED_WORKLOADS)


def _read_jsonl_numbered(path: Path | Traversable) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line, so a bad row can be named by its line."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def _read_jsonl(path: Path | Traversable) -> list[dict[str, Any]]:
    return [row for _, row in _read_jsonl_numbered(path)]


def _data_file(data_dir: Path | None, name: str, subfolder: str | None = None) -> Path | Traversable:
    """``name`` in ``data_dir`` (``--data-dir``), or by default the copy shipped in the package
    (in ``leanserve/data``, or its ``subfolder``; ``--data-dir`` holds every file at its top)."""
    if data_dir is None:
        folder = packaged_data() if subfolder is None else packaged_data().joinpath(subfolder)
        packaged = folder.joinpath(name)
        if not packaged.is_file():
            where = "leanserve/data" if subfolder is None else f"leanserve/data/{subfolder}"
            raise WorkloadError(f"{name} is missing from the installed package ({where}); "
                                f"reinstall leanserve or pass --data-dir DIR (a folder holding {name})")
        return packaged
    if not data_dir.is_dir():
        raise WorkloadError(f"data directory {data_dir} not found; pass --data-dir DIR (a folder holding {name})")
    p = data_dir / name
    if not p.is_file():
        raise WorkloadError(f"{p} not found; pass --data-dir DIR (a folder holding {name})")
    return p


def load_mt_bench(data_dir: Path | None) -> list[dict[str, Any]]:
    """The MT-Bench questions: dicts with question_id, category and turns (list of user messages)."""
    path = _data_file(data_dir, QUESTIONS_FILE)
    rows = _read_jsonl(path)
    for r in rows:
        if not isinstance(r.get("turns"), list) or not r["turns"] or not all(isinstance(t, str) for t in r["turns"]):
            raise WorkloadError(f"{path}: question {r.get('question_id')!r} has no list of string turns")
    if not rows:
        raise WorkloadError(f"{path} holds no questions")
    return rows


def build_shared_prefix(data_dir: Path | None, target_tokens: int) -> str:
    """A long system prompt of real prose (MT-Bench reference answers), ~``target_tokens`` tokens."""
    path = _data_file(data_dir, REFERENCE_FILE)
    paragraphs: list[str] = []
    for row in _read_jsonl(path):
        for choice in row.get("choices") or []:
            paragraphs.extend(t for t in choice.get("turns") or [] if isinstance(t, str) and t.strip())
    if not paragraphs:
        raise WorkloadError(f"{path} holds no reference answers to build a shared prefix from")
    header = ("You are a helpful assistant. Use the following reference notes when they are relevant "
              "to the user's question.\n\n")
    target_chars = int(target_tokens * CHARS_PER_TOKEN)
    text = header
    i = 0
    while len(text) < target_chars:
        text += paragraphs[i % len(paragraphs)].strip() + "\n\n"
        i += 1
    return text[:target_chars].rstrip()


def load_sharegpt(path: Path) -> list[tuple[str, str]]:
    """(first human message, first assistant reply) pairs from a ShareGPT-format .json or .jsonl file."""
    if not path.is_file():
        raise WorkloadError(f"dataset file {path} not found")
    try:
        if path.suffix == ".jsonl":
            data: Any = _read_jsonl(path)
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: expected a JSON list of conversations (ShareGPT format)")
    pairs = []
    for item in data:
        convs = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(convs, list) or len(convs) < 2:
            continue
        first, second = convs[0], convs[1]
        if not (isinstance(first, dict) and isinstance(second, dict)):
            continue
        if first.get("from") not in ("human", "user") or second.get("from") not in ("gpt", "assistant", "chatgpt", "bard", "bing"):
            continue
        prompt, reply = str(first.get("value") or ""), str(second.get("value") or "")
        if prompt.strip() and reply.strip():
            pairs.append((prompt, reply))
    if not pairs:
        raise WorkloadError(f"{path}: no usable conversations (need 'conversations' with a human turn then a gpt turn)")
    return pairs


class _BadRow(Exception):
    """Why one dataset row cannot make a prompt; :func:`load_grounded` adds the file and line."""


def _field(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise _BadRow(f"no string {key!r}")
    return value


def _specbench_prompt(row: dict[str, Any], index: int) -> tuple[str, str]:
    if "question_id" not in row:
        raise _BadRow("no 'question_id'")
    _field(row, "category")
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
        raise _BadRow("no list of string 'turns'")
    return f"specbench-{row['question_id']}", turns[0]


def _code_edit_prompt(row: dict[str, Any], index: int) -> tuple[str, str]:
    task_id = _field(row, "task_id")
    code = _field(row, "prompt") + _field(row, "buggy_solution")
    return task_id, f"{CODE_EDIT_INSTRUCTION}\n\n```python\n{code}```"


def _summarize_prompt(row: dict[str, Any], index: int) -> tuple[str, str]:
    source = row.get("source")
    if not isinstance(source, list) or not source or not all(isinstance(s, str) for s in source):
        raise _BadRow("no list of string 'source' sentences")
    return f"scitldr-{index}", f"{SUMMARIZE_INSTRUCTION}\n\n" + " ".join(source)


_PromptBuilder = Callable[[dict[str, Any], int], tuple[str, str]]  # (row, 0-based row index) -> (source_id, message)
# workload -> (file, prompt builder, the category kept, or None for all)
_GROUNDED: dict[str, tuple[str, _PromptBuilder, str | None]] = {
    "spec-bench": (SPECBENCH_FILE, _specbench_prompt, None),
    "rag": (SPECBENCH_FILE, _specbench_prompt, "rag"),
    "code-edit": (HUMANEVALFIX_FILE, _code_edit_prompt, None),
    "summarize": (SCITLDR_FILE, _summarize_prompt, None),
}


def load_grounded(name: str, data_dir: Path | None) -> list[tuple[str, str]]:
    """(source_id, user message) for each item of an input-grounded workload, in file order.
    ``index`` in a source_id (``scitldr-12``) is the item's 0-based position among the file's rows."""
    file, build, category = _GROUNDED[name]
    path = _data_file(data_dir, file, BENCH_SUBFOLDER)
    items = []
    for index, (lineno, row) in enumerate(_read_jsonl_numbered(path)):
        if not isinstance(row, dict):
            raise WorkloadError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        try:
            item = build(row, index)
        except _BadRow as e:
            raise WorkloadError(f"{path}:{lineno}: {e}") from None
        if category is None or row["category"] == category:
            items.append(item)
    if not items:
        raise WorkloadError(f"{path} holds no {category + ' ' if category else ''}items")
    return items


class _OutputLens:
    def __init__(self, spec: WorkloadSpec, rng: random.Random, default: int | tuple[int, int] | None) -> None:
        self.spec, self.rng, self.default = spec, rng, default

    def draw(self, fallback: int | None = None) -> int | None:
        if self.spec.output_len is not None:
            return self.spec.output_len
        if self.spec.output_len_range is not None:
            return self.rng.randint(*self.spec.output_len_range)
        if fallback is not None:
            return fallback
        if isinstance(self.default, tuple):
            return self.rng.randint(*self.default)
        return self.default


def _cycled(n_items: int, rng: random.Random, limit: int | None) -> Iterator[int]:
    """Indices 0..n_items-1 in a seeded shuffled order, reshuffled each pass; ``limit`` None: forever."""
    count = 0
    while limit is None or count < limit:
        order = list(range(n_items))
        rng.shuffle(order)
        for i in order:
            if limit is not None and count >= limit:
                return
            yield i
            count += 1


def random_text(rng: random.Random, n_tokens: int) -> str:
    """``n_tokens`` random common words: about ``n_tokens`` tokens in a typical BPE vocabulary."""
    return " ".join(rng.choice(_RANDOM_WORDS) for _ in range(n_tokens))


def default_num_prompts(spec: WorkloadSpec) -> int:
    if spec.name == "random":
        return 100
    if spec.name == "sharegpt":
        return 1000
    return 80  # the MT-Bench workloads and the input-grounded ones


def iter_conversations(spec: WorkloadSpec, limit: int | None) -> Iterator[Conversation]:
    """The workload's conversations, repeatable for a given seed. ``limit`` None: an endless stream
    (used with --duration); otherwise exactly ``limit`` conversations, cycling the dataset if needed."""
    rng = random.Random(spec.seed)
    if spec.name in ("chat", "multi-turn", "shared-prefix"):
        questions = load_mt_bench(spec.data_dir)
        system = None
        if spec.name == "shared-prefix":
            system = build_shared_prefix(spec.data_dir, spec.shared_prefix_tokens)
            # Short user messages after the long shared prompt: the MT-Bench first turns that are short.
            questions = [q for q in questions if approx_tokens(q["turns"][0]) <= SHORT_MESSAGE_TOKENS] or questions
        lens = _OutputLens(spec, rng, DEFAULT_CHAT_OUTPUT_LEN)
        for cid, qi in enumerate(_cycled(len(questions), rng, limit)):
            q = questions[qi]
            turns = list(q["turns"]) if spec.name == "multi-turn" else [q["turns"][0]]
            yield Conversation(cid, turns, system=system, output_lens=[lens.draw() for _ in turns],
                               source_id=str(q.get("question_id", qi)))
    elif spec.name in GROUNDED_WORKLOADS:
        items = load_grounded(spec.name, spec.data_dir)
        lens = _OutputLens(spec, rng, DEFAULT_CHAT_OUTPUT_LEN)
        for cid, ii in enumerate(_cycled(len(items), rng, limit)):
            source_id, text = items[ii]
            yield Conversation(cid, [text], output_lens=[lens.draw()], source_id=source_id)
    elif spec.name == "random":
        in_range = spec.input_len_range or ((spec.input_len, spec.input_len) if spec.input_len else DEFAULT_RANDOM_RANGE)
        lens = _OutputLens(spec, rng, DEFAULT_RANDOM_RANGE)
        cid = 0
        while limit is None or cid < limit:
            n_in = rng.randint(*in_range)
            text = random_text(rng, n_in)
            yield Conversation(cid, [text], output_lens=[lens.draw()], approx_input_tokens=[n_in],
                               source_id=f"random-{cid}")
            cid += 1
    elif spec.name == "sharegpt":
        assert spec.dataset_path is not None
        pairs = load_sharegpt(spec.dataset_path)
        lens = _OutputLens(spec, rng, None)
        for cid, pi in enumerate(_cycled(len(pairs), rng, limit)):
            prompt, reply = pairs[pi]
            # Without --output-len, ask for as many tokens as the recorded reply had (vLLM's convention).
            yield Conversation(cid, [prompt], output_lens=[lens.draw(fallback=max(1, approx_tokens(reply)))],
                               source_id=f"sharegpt-{pi}")


def build_messages(conv: Conversation, turn: int, answers: list[str]) -> list[dict[str, str]]:
    """OpenAI chat messages for ``turn``: system prompt, earlier turns with the server's answers, this turn."""
    msgs: list[dict[str, str]] = []
    if conv.system:
        msgs.append({"role": "system", "content": conv.system})
    for i in range(turn):
        msgs.append({"role": "user", "content": conv.turns[i]})
        msgs.append({"role": "assistant", "content": answers[i]})
    msgs.append({"role": "user", "content": conv.turns[turn]})
    return msgs


def render_prompt(messages: list[dict[str, str]]) -> str:
    """Flatten chat messages to one prompt for the /v1/completions endpoint (a plain, model-neutral
    transcript; the chat endpoint applies the model's own template instead)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    parts = [f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    return "\n\n".join(parts) + "\n\nAssistant:"
