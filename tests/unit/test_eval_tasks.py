"""Eval tasks against a fake backend whose numbers can be worked out by hand: parsing (ARC, HellaSwag,
TriviaQA, task files), acc against acc_norm, the context/continuation boundary, perplexity windows,
bits per byte, exact-match normalization, and --limit/--seed subsets.

`FakeBackend` (also used by the other test_eval_* files): one token per character (its code point;
BOS = 1 when special tokens are asked for and ``bos``), optional merges of a character pair into one
token, and a bigram rule: log p(token | previous) = -0.25 when the token repeats the previous one,
else -2.0. A generated answer's token logprobs follow the same rule (its first token given the
prompt's last). Every call is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from leanserve.eval.backend import CostTally, GenerateRequest, Generation, Score, ScoreRequest
from leanserve.eval.tasks import (
    Document,
    EvalOptions,
    GenerationItem,
    GenerationTask,
    MultipleChoiceItem,
    MultipleChoiceTask,
    PerplexityTask,
    Selection,
    TaskError,
    Window,
    arc_context,
    builtin_task,
    continuation_request,
    exact_match,
    hellaswag_preprocess,
    judge,
    load_arc_easy,
    load_hellaswag,
    load_task_file,
    load_triviaqa,
    normalize_answer,
    parse_hellaswag,
    resolve_tasks,
    rolling_windows,
    token_char_offset,
)

BOS = 1
SAME, OTHER = -0.25, -2.0
SECONDS_PER_TOKEN = 0.01  # the fake's meter: machine-seconds per prompt or output token
USD_PER_SECOND = 0.5


def bigram(prev: int, tok: int) -> float:
    return SAME if tok == prev else OTHER


@dataclass
class FakeBackend:
    max_length: int = 64
    bos: bool = False
    merges: dict[str, int] = field(default_factory=dict)  # "ab" -> one token id
    answers: dict[str, str] = field(default_factory=dict)  # prompt -> generated text
    usd: bool = True  # False: like a server that reports no cost
    score_calls: list[list[ScoreRequest]] = field(default_factory=list)
    generate_calls: list[list[GenerateRequest]] = field(default_factory=list)
    tokenize_calls: int = 0
    _cost: CostTally = field(default_factory=CostTally)
    closed: bool = False

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.tokenize_calls += 1
        ids = [BOS] if self.bos and add_special_tokens else []
        i = 0
        while i < len(text):
            pair = text[i:i + 2]
            if pair in self.merges:
                ids.append(self.merges[pair])
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        self.score_calls.append(list(requests))
        out = []
        for r in requests:
            lps = tuple(bigram(r.token_ids[i - 1], r.token_ids[i]) for i in range(r.start, len(r.token_ids)))
            out.append(Score(lps, all(lp == SAME for lp in lps)))
            self._charge(len(r.token_ids), 0)
        return out

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        self.generate_calls.append(list(requests))
        out = []
        for r in requests:
            text = self.answers.get(r.prompt, "")
            ids = [ord(r.prompt[-1])] + self.tokenize(text, add_special_tokens=False)
            seconds, usd = self._charge(len(r.prompt), len(text))
            out.append(Generation(text, tuple(bigram(a, b) for a, b in zip(ids, ids[1:])), usd, seconds))
        return out

    def _charge(self, prompt: int, output: int) -> tuple[float, float | None]:
        seconds = (prompt + output) * SECONDS_PER_TOKEN
        usd = seconds * USD_PER_SECOND if self.usd else None
        self._cost.add(CostTally(machine_seconds=seconds, usd=usd, prompt_tokens=prompt, output_tokens=output,
                                 requests=1, wall_seconds=seconds))
        return seconds, usd

    def cost(self) -> CostTally:
        return self._cost

    def describe(self) -> dict:
        return {"backend": "fake", "model": "/models/bigram-chars", "dtype": "float32", "quantization": None,
                "max_model_len": self.max_length}

    def close(self) -> None:
        self.closed = True


def mc_task(items: list[MultipleChoiceItem]) -> MultipleChoiceTask:
    return MultipleChoiceTask("mc", lambda: items, "test", "test")


# ----------------------------------------------------------------------------- multiple choice

def test_acc_and_acc_norm_choose_differently_on_a_crafted_item():
    # " ab":         ' '(-2) 'a'(-2) 'b'(-2)             = -6.0, / 2 bytes  = -3.0
    # " cccccccccc": ' '(-2) 'c'(-2) then 9 x 'c'(-0.25) = -6.25, / 10 bytes = -0.625
    item = MultipleChoiceItem(0, "Q", ("ab", "cccccccccc"), gold=1)
    out = mc_task([item]).run(FakeBackend(), EvalOptions())
    rec = out.items[0]
    assert rec["logprobs"] == [-6.0, -6.25] and rec["tokens"] == [3, 11]
    assert (rec["chosen"], rec["chosen_norm"], rec["correct"], rec["correct_norm"]) == (0, 1, False, True)
    assert out.metrics == {"acc": 0.0, "acc_norm": 1.0}


def test_acc_norm_divides_by_utf8_bytes_of_the_choice_not_characters():
    # "éé": -4.0 over 4 bytes = -1.0 (over 2 characters: -2.0); "xyz": -4.5 over 3 bytes (and characters) = -1.5
    rec = judge(MultipleChoiceItem(0, "Q", ("éé", "xyz"), gold=1), [-4.0, -4.5], [3, 4])
    assert rec["chosen_norm"] == 0  # by characters it would be 1
    # the leading space is not counted: "a" -1.0/1 < "bb" -1.8/2 (with the space: -0.5 > -0.6, "a" would win)
    assert judge(MultipleChoiceItem(0, "Q", ("a", "bb"), gold=1), [-1.0, -1.8], [2, 3])["chosen_norm"] == 1
    assert judge(MultipleChoiceItem(0, "Q", ("a", "b"), 0), [-1.0, -1.0], [2, 2])["chosen"] == 0  # ties: the first


def test_context_and_continuation_are_tokenized_as_lm_eval_does():
    fb = FakeBackend(bos=True)
    ctx = fb.tokenize("Q:")
    req = continuation_request(fb, "Q:", " ab", ctx)
    assert req == ScoreRequest((BOS, ord("Q"), ord(":"), ord(" "), ord("a"), ord("b")), start=3)


def test_a_token_across_the_boundary_falls_back_to_the_continuation_alone():
    # ":" + " " merge into one token in the whole text, so whole[:len(ctx)] != ctx
    fb = FakeBackend(bos=True, merges={": ": 500})
    ctx = fb.tokenize("Q:")
    assert fb.tokenize("Q: ab") == [BOS, ord("Q"), 500, ord("a"), ord("b")]
    req = continuation_request(fb, "Q:", " ab", ctx)
    assert req == ScoreRequest((BOS, ord("Q"), ord(":"), ord(" "), ord("a"), ord("b")), start=3)


def test_a_context_longer_than_the_model_is_cut_from_the_left():
    fb = FakeBackend(max_length=5)
    req = continuation_request(fb, "abcdef", " x", fb.tokenize("abcdef"))
    assert req.token_ids == tuple(map(ord, "def x")) and req.start == 3
    with pytest.raises(TaskError, match="no context token"):
        continuation_request(fb, "", " abc", [])


def test_all_choices_of_a_batch_go_in_one_score_call_with_shared_contexts_adjacent():
    items = [MultipleChoiceItem(0, "P", ("a", "b"), 0), MultipleChoiceItem(1, "Q", ("c", "d"), 0),
             MultipleChoiceItem(2, "P", ("e", "f"), 0), MultipleChoiceItem(3, "R", ("g", "h"), 0),
             MultipleChoiceItem(4, "Q", ("i", "j"), 0)]
    fb = FakeBackend()
    out = mc_task(items).run(fb, EvalOptions(batch_size=3))
    assert [len(c) for c in fb.score_calls] == [6, 4]
    sent = [bytes(r.token_ids).decode() for call in fb.score_calls for r in call]
    assert sent == ["P a", "P b", "P e", "P f", "Q c", "Q d", "Q i", "Q j", "R g", "R h"]
    assert [r["index"] for r in out.items] == [0, 1, 2, 3, 4]  # records back in file order


# ----------------------------------------------------------------------------- data parsing

HELLASWAG = """Roof shingle removal: A man is sitting on a roof.  he
3
is using wrap to wrap a pair of skis.
is ripping level tiles off.
is holding a rubik's cube.
starts pulling up roofing on a roof.  
Family Life: How to play [title] Ask the toddler. [step] Visit a site
0
 first  ending.
second [header] ending.
third
fourth
"""


def test_hellaswag_text_format_is_parsed_with_lm_eval_preprocessing():
    items = parse_hellaswag(HELLASWAG)
    assert items == [
        MultipleChoiceItem(0, "Roof shingle removal: A man is sitting on a roof. he",
                           ("is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                            "is holding a rubik's cube.", "starts pulling up roofing on a roof."), 3),
        MultipleChoiceItem(1, "Family Life: How to play. Ask the toddler. Visit a site",
                           ("first ending.", "second ending.", "third", "fourth"), 0),
    ]
    assert hellaswag_preprocess("  a  b [x] c  ") == "a b c"


@pytest.mark.parametrize("text, error", [
    ("ctx: a\n3\nx\ny\nz\n", r"5 lines, expected 6 per item"),
    ("ctx: a\n4\nw\nx\ny\nz\n", r":2: expected the gold index 0-3, got '4'"),
    ("no label here\n1\nw\nx\ny\nz\n", r":1: expected 'label: context'"),
])
def test_malformed_hellaswag_is_a_clear_error(text, error):
    with pytest.raises(TaskError, match=error):
        parse_hellaswag(text)


def test_packaged_hellaswag_arc_and_triviaqa_load():
    hs = load_hellaswag()
    assert len(hs) == 10042
    assert hs[0] == MultipleChoiceItem(0, "Roof shingle removal: A man is sitting on a roof. he",
                                       ("is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                        "is holding a rubik's cube.", "starts pulling up roofing on a roof."), 3)
    arc = load_arc_easy()
    assert len(arc) == 2376 and all(len(i.choices) == 4 for i in arc)
    assert arc[0].context == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                              "food webs?\nAnswer:") and arc[0].gold == 0
    tq = load_triviaqa()
    assert len(tq) == 3000
    assert tq[0].prompt == "Question: Brunswick, Lancastrian and Pearl Pickler are types of which vegetable?\nAnswer:"
    assert tq[0].answers[0] == "Onion" and "Allium cepa" in tq[0].answers


def test_arc_context_adds_only_the_framing_the_query_lacks():
    assert arc_context("Question: Why?") == "Question: Why?\nAnswer:"
    assert arc_context("Why?") == "Question: Why?\nAnswer:"
    assert arc_context("Question: Why?\nAnswer:") == "Question: Why?\nAnswer:"


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(TaskError, match=r"unknown task 'arc'; known tasks: arc_easy, hellaswag, triviaqa, wikitext2"):
        builtin_task("arc")
    with pytest.raises(TaskError, match="given twice"):
        resolve_tasks(["arc_easy", "arc_easy"])


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("prediction, answers, expected", [
    ("The Beatles!", ["Beatles"], True),
    ("  an   Apple. ", ["apple"], True),
    ("St. Louis", ["st louis"], True),
    ("Paris, France", ["Paris"], False),
    ("the", ["The"], False),  # an answer that normalizes to nothing never matches
    ("Tolkien", ["J.R.R. Tolkien", "Tolkien"], True),
    ("onion", ["Onions"], False),
])
def test_exact_match_uses_squad_normalization(prediction, answers, expected):
    assert exact_match(prediction, answers) is expected


def test_normalize_answer():
    assert normalize_answer("  The  Quick, brown-fox's A  tale ") == "quick brownfoxs tale"


def test_generation_is_greedy_short_and_answers_with_the_first_non_empty_line():
    items = [GenerationItem(0, "Question: a?\nAnswer:", ("Paris",)), GenerationItem(1, "Question: b?\nAnswer:", ("x",)),
             GenerationItem(2, "Question: c?\nAnswer:", ("St. Louis",))]
    fb = FakeBackend(answers={"Question: a?\nAnswer:": " paris.\nQuestion: next", "Question: c?\nAnswer:": "\n\n St. Louis \n"})
    out = GenerationTask("qa", lambda: items, "t", "t").run(fb, EvalOptions())
    assert fb.generate_calls == [[GenerateRequest("Question: a?\nAnswer:", 24, ()),
                                  GenerateRequest("Question: b?\nAnswer:", 24, ()),
                                  GenerateRequest("Question: c?\nAnswer:", 24, ())]]
    assert [r["prediction"] for r in out.items] == ["paris.", "", "St. Louis"]
    assert [r["correct"] for r in out.items] == [True, False, True] and out.metrics == {"exact_match": 2 / 3}


def test_a_generated_item_records_its_token_logprobs_scores_and_own_cost():
    # "Question: a?\nAnswer:" (20 chars) -> " aa": ' ' after ':' (-2), 'a' after ' ' (-2), 'a' after 'a' (-0.25)
    items = [GenerationItem(0, "Question: a?\nAnswer:", ("aa",)), GenerationItem(1, "Question: b?\nAnswer:", ("x",))]
    fb = FakeBackend(answers={"Question: a?\nAnswer:": " aa"})
    out = GenerationTask("qa", lambda: items, "t", "t").run(fb, EvalOptions())
    a, b = out.items
    assert a["token_logprobs"] == [-2.0, -2.0, -0.25] and a["correct"] is True
    assert a["scores"] == {"mean_logprob": -4.25 / 3, "min_logprob": -2.0}
    assert (a["machine_seconds"], a["cost_usd"]) == pytest.approx((0.23, 0.115))  # (20 + 3) x 0.01 s, x $0.5/s
    assert b["token_logprobs"] == [] and b["scores"] == {"mean_logprob": -math.inf, "min_logprob": -math.inf}
    assert (b["machine_seconds"], b["cost_usd"]) == pytest.approx((0.2, 0.1))
    assert a["cost_usd"] + b["cost_usd"] == pytest.approx(fb.cost().usd)  # the items' costs add up to the run's


# ----------------------------------------------------------------------------- perplexity

def test_rolling_windows_score_each_token_once_given_the_window_before_it():
    assert rolling_windows(10, 4, 3) == [Window(0, 4, 1), Window(3, 7, 4), Window(6, 10, 7)]
    assert rolling_windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    assert rolling_windows(5, 8, 7) == [Window(0, 5, 1)]
    assert rolling_windows(1, 4, 3) == [] and rolling_windows(0, 4, 3) == []


@pytest.mark.parametrize("n", [2, 3, 7, 64, 101])
@pytest.mark.parametrize("length, stride", [(2, 1), (4, 3), (4, 1), (16, 15), (16, 8)])
def test_windows_score_every_token_but_the_first_exactly_once(n, length, stride):
    wins = rolling_windows(n, length, stride)
    scored = [t for w in wins for t in range(w.score_from, w.end)]
    assert scored == list(range(1, n))  # N - 1 tokens, in order, none twice
    assert all(w.end - w.begin <= length and w.begin < w.score_from for w in wins)


def test_a_stride_that_would_leave_tokens_unscored_is_refused():
    with pytest.raises(TaskError, match="--stride must be between 1 and --context-length - 1"):
        rolling_windows(10, 4, 4)
    with pytest.raises(TaskError, match="--stride"):
        EvalOptions(context_length=8, stride=8)


def ppl_task(texts: list[str], windows_are_items: bool = False) -> PerplexityTask:
    return PerplexityTask("ppl", lambda: [Document(i, t) for i, t in enumerate(texts)], "t", "t",
                          windows_are_items=windows_are_items)


def test_perplexity_windows_send_the_right_tokens_and_start():
    fb = FakeBackend()
    out = ppl_task(["abcdefghij"], windows_are_items=True).run(fb, EvalOptions(context_length=4, stride=3))
    sent = [(bytes(r.token_ids).decode(), r.start) for call in fb.score_calls for r in call]
    assert sent == [("abcd", 1), ("defg", 1), ("ghij", 1)]
    assert [(r["begin"], r["end"], r["score_from"], r["tokens"]) for r in out.items] == [(0, 4, 1, 3), (3, 7, 4, 3),
                                                                                        (6, 10, 7, 3)]
    assert out.details["tokens_scored"] == 9 and out.details["tokens_total"] == 10


def test_perplexity_and_bits_per_byte_on_a_known_text():
    # "aéé": 'é' after 'a' (-2), 'é' after 'é' (-0.25): NLL 2.25 nats over 2 tokens, the scored text "éé" = 4 bytes
    out = ppl_task(["aéé"]).run(FakeBackend(), EvalOptions(context_length=4))
    assert out.metrics["perplexity"] == pytest.approx(math.exp(2.25 / 2), rel=1e-12)
    assert out.metrics["bits_per_byte"] == pytest.approx(2.25 / math.log(2) / 4, rel=1e-12)
    assert out.details | {} == {"context_length": 4, "stride": 3, "windows": 1, "tokens_total": 3, "tokens_scored": 2,
                                "bytes_scored": 4, "bytes_exact": True, "nll_sum": 2.25, "documents": 1}
    assert out.items == [{"index": 0, "tokens": 2, "nll": 2.25, "bytes": 4, "tokens_total": 3}]


def test_bits_per_byte_counts_the_bytes_of_the_scored_tokens_with_a_merged_first_token():
    # "ab" is one token: the text "abccd" is tokens [ab, c, c, d]; scored c|ab (-2), c|c (-0.25), d|c (-2): 4.25 nats
    # over "ccd" = 3 bytes (the first token's two bytes are not scored, so not counted)
    fb = FakeBackend(merges={"ab": 300})
    out = ppl_task(["abccd"]).run(fb, EvalOptions(context_length=8))
    assert out.details["tokens_scored"] == 3 and out.details["bytes_scored"] == 3
    assert out.metrics["bits_per_byte"] == pytest.approx(4.25 / math.log(2) / 3, rel=1e-12)


def test_limit_on_wikitext_means_the_first_windows_and_bytes_end_with_them():
    fb = FakeBackend(merges={"ab": 300})
    text = "abcdefghijklmnop"  # tokens: ab c d e ... p (15 tokens)
    out = ppl_task([text], windows_are_items=True).run(fb, EvalOptions(Selection(limit=2, seed=9), context_length=4))
    assert [(r["begin"], r["end"]) for r in out.items] == [(0, 4), (3, 7)]
    assert out.details["tokens_scored"] == 6 and out.details["bytes_scored"] == len("cdefgh")
    assert out.num_items_available == 5 and out.selection["method"] == "first"


def test_token_char_offset_finds_token_boundaries_in_the_text():
    fb = FakeBackend(merges={"ab": 300})
    text = "xabyab"
    ids = fb.tokenize(text, add_special_tokens=False)
    assert ids == [ord("x"), 300, ord("y"), 300]
    assert [token_char_offset(fb, text, ids, k) for k in range(5)] == [0, 1, 3, 4, 6]
    long = "q" * 100 + "ab" + "z" * 50
    ids = fb.tokenize(long, add_special_tokens=False)
    assert token_char_offset(fb, long, ids, 101) == 102 and token_char_offset(fb, long, ids, 100) == 100


def test_documents_are_items_of_a_text_task():
    fb = FakeBackend()
    out = ppl_task(["aaaa", "ab", "x"]).run(fb, EvalOptions(context_length=4))
    # "aaaa": 3 x -0.25; "ab": -2; "x": one token, nothing to score
    assert [(r["index"], r["tokens"], r["nll"], r["bytes"]) for r in out.items] == [(0, 3, 0.75, 3), (1, 1, 2.0, 1),
                                                                                    (2, 0, 0.0, 0)]
    assert out.metrics["perplexity"] == pytest.approx(math.exp(2.75 / 4))


def test_wikitext2_default_window_is_capped_by_the_model():
    task = builtin_task("wikitext2")
    assert task.windowing(FakeBackend(max_length=512), EvalOptions()) == (512, 511)
    assert task.windowing(FakeBackend(max_length=8192), EvalOptions()) == (1024, 1023)
    with pytest.raises(TaskError, match="more than the model's context"):
        task.windowing(FakeBackend(max_length=512), EvalOptions(context_length=1024))


# ----------------------------------------------------------------------------- --limit / --seed / --first

def test_a_seeded_subset_is_stable_nested_and_recorded():
    s = Selection(limit=5, seed=0)
    assert s.pick(20) == [0, 10, 14, 16, 18]  # pinned: random.Random(0).shuffle is the same on every Python 3
    assert s.pick(20) == Selection(limit=5, seed=0).pick(20)
    assert Selection(limit=5, seed=1).pick(20) != s.pick(20)
    assert set(s.pick(20)) <= set(Selection(limit=10, seed=0).pick(20))  # a smaller N is part of a larger one
    assert Selection(first=3).pick(20) == [0, 1, 2] and Selection(limit=50).pick(20) == list(range(20))
    assert s.describe(20) == {"method": "seeded_shuffle", "limit": 5, "first": None, "seed": 0}
    assert Selection(first=3).describe(20)["method"] == "first" and Selection(limit=50).describe(20)["method"] == "all"
    with pytest.raises(TaskError, match="exclude each other"):
        Selection(limit=1, first=1)


def test_the_subset_does_not_depend_on_the_backend():
    items = [MultipleChoiceItem(i, f"C{i}", ("a", "b"), 0) for i in range(30)]
    opts = EvalOptions(Selection(limit=7, seed=3))
    a = mc_task(items).run(FakeBackend(), opts)
    b = mc_task(items).run(FakeBackend(bos=True, merges={"C1": 400}), opts)
    assert [r["index"] for r in a.items] == [r["index"] for r in b.items] == Selection(limit=7, seed=3).pick(30)


# ----------------------------------------------------------------------------- task files

def write(tmp_path: Path, text: str, name: str = "mine.jsonl") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_task_file_shapes(tmp_path):
    mc = load_task_file(write(tmp_path, '{"query": "2+2=", "choices": ["4", "5"], "gold": 0}\n\n'
                                        '{"query": "Sky?", "choices": ["blue", "green", "red"], "gold": 0, "id": 7}\n'))
    assert mc.name == "mine" and mc.kind == "multiple_choice"
    assert mc.items() == [MultipleChoiceItem(0, "2+2=", ("4", "5"), 0), MultipleChoiceItem(1, "Sky?", ("blue", "green", "red"), 0)]
    fb = FakeBackend()
    mc.run(fb, EvalOptions())
    assert bytes(fb.score_calls[0][0].token_ids).decode() == "2+2= 4"  # the query verbatim, then " " + choice
    qa = load_task_file(write(tmp_path, '{"question": "Capital of France?", "answers": ["Paris"]}\n', "qa.jsonl"))
    assert qa.kind == "generation" and qa.items() == [GenerationItem(0, "Question: Capital of France?\nAnswer:", ("Paris",))]
    text = load_task_file(write(tmp_path, '{"text": "one"}\n{"text": "two"}\n', "docs.jsonl"))
    assert text.kind == "perplexity" and text.documents() == [Document(0, "one"), Document(1, "two")]


@pytest.mark.parametrize("content, error", [
    ('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": oops}\n', r"mine\.jsonl:2: not valid JSON"),
    ('["query", "choices"]\n', r"mine\.jsonl:1: expected a JSON object"),
    ('{"prompt": "x"}\n', r"mine\.jsonl:1: no known fields \(prompt\)"),
    ('{"text": "a"}\n{"question": "q", "answers": ["a"]}\n', r"mine\.jsonl:2: a generation line, but line 1 is perplexity"),
    ('{"query": "q", "text": "t"}\n', r"mine\.jsonl:1: mixes the fields of several shapes"),
    ('{"query": "q", "choices": ["a", "b"]}\n', r"mine\.jsonl:1: .* missing gold"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}\n', r"mine\.jsonl:1: 'gold' must be a whole number from 0 to 1"),
    ('{"query": "q", "choices": ["a", "b"], "gold": true}\n', r"mine\.jsonl:1: 'gold' must be"),
    ('{"query": "q", "choices": ["a"], "gold": 0}\n', r"mine\.jsonl:1: 'choices' must be a list of at least 2"),
    ('{"question": "", "answers": ["a"]}\n', r"mine\.jsonl:1: 'question' must be a non-empty string"),
    ('{"question": "q", "answers": "a"}\n', r"mine\.jsonl:1: 'answers' must be a list"),
    ('{"text": 5}\n', r"mine\.jsonl:1: 'text' must be a non-empty string"),
    ("\n\n", r"mine\.jsonl: no items"),
])
def test_malformed_task_files_name_the_file_and_line(tmp_path, content, error):
    with pytest.raises(TaskError, match=error) as e:
        load_task_file(write(tmp_path, content))
    assert "\n" not in str(e.value)


def test_unreadable_task_files(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        load_task_file(tmp_path / "none.jsonl")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(TaskError, match=r"latin1\.jsonl: not UTF-8"):
        load_task_file(bad)
