"""Workloads: counts, seeded repeatability, history re-sent, shared prefix shared, length ranges, the
input-grounded prompts built exactly, and one-line errors for bad data files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from leanserve.bench.workloads import (
    WorkloadError,
    WorkloadSpec,
    approx_tokens,
    build_messages,
    default_num_prompts,
    iter_conversations,
    needs_data_dir,
    packaged_data,
    render_prompt,
)
from tests.conftest import run_in_installed_copy

ROOT = Path(__file__).resolve().parents[2]
DATA = packaged_data()


def take(spec: WorkloadSpec, n: int | None) -> list:
    return list(iter_conversations(spec, n))


def test_chat_and_shared_prefix_workloads_need_nothing_beside_the_installed_package(tmp_path):
    out = run_in_installed_copy(tmp_path, """
        from leanserve.bench.workloads import WorkloadSpec, iter_conversations
        chat = list(iter_conversations(WorkloadSpec("chat"), 80))
        shared = list(iter_conversations(WorkloadSpec("shared-prefix"), 2))
        print(json.dumps({"first_turns": [c.turns[0] for c in chat], "system": shared[0].system}))
    """, timeout=60)
    assert len(set(out["first_turns"])) == 80
    assert any(t.startswith("Compose an engaging travel blog post about a recent trip to Hawaii")
               for t in out["first_turns"])
    assert "reference notes" in out["system"] and approx_tokens(out["system"]) > 1000


def test_data_dir_overrides_the_packaged_questions(tmp_path):
    rows = [{"question_id": 1, "turns": ["first question?", "and then?"]}, {"question_id": 2, "turns": ["second?"]}]
    (tmp_path / "mt_bench_questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    convs = take(WorkloadSpec("chat", data_dir=tmp_path), 4)
    assert sorted(c.turns[0] for c in convs) == ["first question?", "first question?", "second?", "second?"]


def test_packaged_files_are_described_with_their_license():
    readme = DATA.joinpath("README.md").read_text(encoding="utf-8")
    for name in ("mt_bench_questions.jsonl", "mt_bench_reference_answers.jsonl"):
        assert DATA.joinpath(name).is_file() and name in readme
    assert "Apache-2.0" in readme and "FastChat" in readme
    assert "Apache License" in DATA.joinpath("LICENSE-mt-bench").read_text(encoding="utf-8")


def test_chat_is_the_80_first_turns_each_once():
    convs = take(WorkloadSpec("chat"), 80)
    assert len(convs) == 80
    assert all(len(c.turns) == 1 and c.system is None for c in convs)
    assert len({c.source_id for c in convs}) == 80  # a full pass covers every question exactly once
    lines = DATA.joinpath("mt_bench_questions.jsonl").read_text(encoding="utf-8").splitlines()
    questions = [json.loads(line) for line in lines if line]
    first_turns = {q["turns"][0] for q in questions}
    assert {c.turns[0] for c in convs} == first_turns
    assert all(c.output_lens == [128] for c in convs)  # the default fixed output length


def test_more_prompts_than_questions_cycles_and_fewer_truncates():
    assert len(take(WorkloadSpec("chat"), 200)) == 200
    assert len(take(WorkloadSpec("chat"), 5)) == 5


@pytest.mark.parametrize("name", ["chat", "multi-turn", "shared-prefix", "random", "spec-bench", "rag", "code-edit",
                                  "summarize"])
def test_same_seed_same_workload_other_seed_other_order(name):
    def key(convs):
        return [(c.turns, c.output_lens, c.system) for c in convs]
    spec = WorkloadSpec(name, seed=7, output_len_range=(10, 500))
    assert key(take(spec, 12)) == key(take(spec, 12))
    assert key(take(WorkloadSpec(name, seed=8, output_len_range=(10, 500)), 12)) != key(take(spec, 12))


def test_multi_turn_has_both_turns_and_resends_the_actual_answer():
    convs = take(WorkloadSpec("multi-turn"), 80)
    assert all(len(c.turns) == 2 for c in convs)
    c = convs[0]
    msgs = build_messages(c, 1, ["THE SERVER'S ANSWER"])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == c.turns[0]
    assert msgs[1]["content"] == "THE SERVER'S ANSWER"
    assert msgs[2]["content"] == c.turns[1]
    prompt = render_prompt(msgs)  # the completions endpoint gets the same history as text
    assert c.turns[0] in prompt and "THE SERVER'S ANSWER" in prompt and prompt.endswith("Assistant:")


def test_shared_prefix_is_one_long_system_prompt_with_short_user_messages():
    convs = take(WorkloadSpec("shared-prefix", shared_prefix_tokens=1500), 20)
    prefixes = {c.system for c in convs}
    assert len(prefixes) == 1
    prefix = prefixes.pop()
    assert prefix is not None and 1000 <= approx_tokens(prefix) <= 2000
    assert "reference notes" in prefix  # real text from the reference answers, after a header
    assert all(approx_tokens(c.turns[0]) <= 150 for c in convs)
    assert len({c.turns[0] for c in convs}) > 10  # the user messages differ
    msgs = build_messages(convs[0], 0, [])
    assert msgs[0] == {"role": "system", "content": prefix}
    assert convs[3].approx_input_tokens[0] >= approx_tokens(prefix)


def test_random_lengths_are_uniform_in_the_ranges():
    spec = WorkloadSpec("random", seed=1, input_len_range=(100, 1024), output_len_range=(100, 1024))
    convs = take(spec, 300)
    ins = [c.approx_input_tokens[0] for c in convs]
    outs = [c.output_lens[0] for c in convs]
    assert min(ins) >= 100 and max(ins) <= 1024 and min(outs) >= 100 and max(outs) <= 1024
    assert 450 < sum(ins) / len(ins) < 680  # mean of U(100, 1024) is 562
    assert len(set(outs)) > 150
    # input length is approximated by counting common words, each about one token
    assert all(len(c.turns[0].split()) == n for c, n in zip(convs, ins))


def test_random_defaults_follow_nano_vllm_and_fixed_lengths_work():
    convs = take(WorkloadSpec("random"), 50)
    assert all(100 <= c.output_lens[0] <= 1024 for c in convs)
    fixed = take(WorkloadSpec("random", input_len=64, output_len=32), 5)
    assert all(c.approx_input_tokens == [64] and c.output_lens == [32] for c in fixed)


def test_random_needs_no_data_dir(tmp_path):
    assert len(take(WorkloadSpec("random", data_dir=tmp_path / "missing"), 3)) == 3


def test_unbounded_stream_for_duration_runs():
    it = iter_conversations(WorkloadSpec("random", input_len=8, output_len=4), None)
    assert len([next(it) for _ in range(1000)]) == 1000


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(WorkloadError, match="data directory .* not found; pass --data-dir"):
        take(WorkloadSpec("chat", data_dir=tmp_path / "nope"), 1)
    with pytest.raises(WorkloadError, match="mt_bench_questions.jsonl not found"):
        take(WorkloadSpec("chat", data_dir=tmp_path), 1)


def test_sharegpt_file(tmp_path: Path):
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "Hello there, how are you?"},
                                      {"from": "gpt", "value": "x" * 400}]},
        {"id": "b", "conversations": [{"from": "human", "value": "only one turn"}]},  # skipped
        {"id": "c", "conversations": [{"from": "human", "value": "Tell me a joke."},
                                      {"from": "gpt", "value": "y" * 40}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    convs = take(WorkloadSpec("sharegpt", dataset_path=path), 4)
    assert len(convs) == 4
    assert {c.turns[0] for c in convs} == {"Hello there, how are you?", "Tell me a joke."}
    by_prompt = {c.turns[0]: c.output_lens[0] for c in convs}
    assert by_prompt == {"Hello there, how are you?": 100, "Tell me a joke.": 10}  # reply length / 4
    fixed = take(WorkloadSpec("sharegpt", dataset_path=path, output_len=7), 2)
    assert all(c.output_lens == [7] for c in fixed)


def test_sharegpt_errors(tmp_path: Path):
    with pytest.raises(WorkloadError, match="not found"):
        take(WorkloadSpec("sharegpt", dataset_path=tmp_path / "none.json"), 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(WorkloadError, match="not valid JSON"):
        take(WorkloadSpec("sharegpt", dataset_path=bad), 1)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(WorkloadError, match="no usable conversations"):
        take(WorkloadSpec("sharegpt", dataset_path=empty), 1)
    with pytest.raises(WorkloadError, match="--dataset-path"):
        WorkloadSpec("sharegpt")


def test_bad_specs_are_rejected():
    with pytest.raises(WorkloadError, match="unknown workload"):
        WorkloadSpec("poetry")
    with pytest.raises(WorkloadError, match="LO:HI"):
        WorkloadSpec("random", input_len_range=(500, 100))
    with pytest.raises(WorkloadError, match=">= 1"):
        WorkloadSpec("random", output_len=0)


def test_approx_tokens_is_four_characters_per_token():
    assert approx_tokens("") == 0
    assert approx_tokens("abcd") == 1
    assert approx_tokens("abcde") == 2
    assert approx_tokens("x" * 4000) == 1000


# Input-grounded workloads (speculative decoding pays when the answer re-uses the prompt's text).

SHARED_EVAL = ROOT.parent / "shared" / "data" / "eval"
BENCH = DATA.joinpath("bench")
BENCH_FILES = ("specbench_questions.jsonl", "humanevalfix_python.jsonl", "scitldr_a_test.jsonl")
GROUNDED = {"spec-bench": ("specbench_questions.jsonl", 400), "rag": ("specbench_questions.jsonl", 80),
            "code-edit": ("humanevalfix_python.jsonl", 164), "summarize": ("scitldr_a_test.jsonl", 618)}


def bench_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in BENCH.joinpath(name).read_text(encoding="utf-8").splitlines() if line]


@pytest.mark.parametrize("name", BENCH_FILES)
def test_packaged_bench_file_is_the_shared_file_unchanged(name):
    if not SHARED_EVAL.is_dir():
        pytest.skip(f"{SHARED_EVAL} is absent")
    assert BENCH.joinpath(name).read_bytes() == (SHARED_EVAL / name).read_bytes()


def test_bench_files_are_described_with_source_and_license():
    readme = BENCH.joinpath("README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line for line in readme.splitlines() if line.startswith("| `")}
    assert set(rows) == set(BENCH_FILES)
    assert "Apache-2.0" in rows["specbench_questions.jsonl"] and "Xia" in rows["specbench_questions.jsonl"]
    assert "summarization items" in rows["specbench_questions.jsonl"]
    assert "MIT" in rows["humanevalfix_python.jsonl"] and "Muennighoff" in rows["humanevalfix_python.jsonl"]
    assert "Apache-2.0" in rows["scitldr_a_test.jsonl"] and "Cachola" in rows["scitldr_a_test.jsonl"]


@pytest.mark.parametrize("name", sorted(GROUNDED))
def test_grounded_workload_one_pass_is_every_item_once(name):
    _, n_items = GROUNDED[name]
    convs = take(WorkloadSpec(name), n_items)
    assert len({c.source_id for c in convs}) == n_items  # a full pass covers every item exactly once
    assert all(len(c.turns) == 1 and c.system is None and c.output_lens == [128] for c in convs)
    again = take(WorkloadSpec(name), n_items + 1)  # the next pass starts over
    assert again[:n_items] == convs and again[n_items].source_id in {c.source_id for c in convs}
    assert default_num_prompts(WorkloadSpec(name)) == 80 and needs_data_dir(name)


def test_spec_bench_is_the_first_turns_of_all_400_and_rag_its_80_rag_items():
    rows = bench_rows("specbench_questions.jsonl")
    by_id = {f"specbench-{r['question_id']}": r for r in rows}
    convs = take(WorkloadSpec("spec-bench"), 400)
    assert {c.source_id for c in convs} == set(by_id)
    assert all(c.turns == [by_id[c.source_id]["turns"][0]] for c in convs)
    assert {by_id[c.source_id]["category"] for c in convs} >= {"translation", "qa", "math_reasoning", "rag", "writing"}
    q81 = next(c for c in convs if c.source_id == "specbench-81")
    assert q81.turns == ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting "
                         "cultural experiences and must-see attractions."]
    rag = take(WorkloadSpec("rag"), 80)
    assert {c.source_id for c in rag} == {k for k, r in by_id.items() if r["category"] == "rag"}
    assert {c.source_id for c in rag} == {f"specbench-{i}" for i in range(481, 561)}
    assert all(c.turns == [by_id[c.source_id]["turns"][0]] for c in rag)


def test_code_edit_asks_to_fix_the_buggy_function():
    row = next(r for r in bench_rows("humanevalfix_python.jsonl") if r["task_id"] == "Python/0")
    conv = next(c for c in take(WorkloadSpec("code-edit"), 164) if c.source_id == "Python/0")
    expected = ("Fix the bug in the following Python function. Reply with the whole corrected function only.\n\n"
                "```python\n" + row["prompt"] + row["buggy_solution"] + "```")
    assert conv.turns == [expected]
    assert conv.turns[0].startswith("Fix the bug in the following Python function.")
    assert row["buggy_solution"] in conv.turns[0] and row["canonical_solution"] not in conv.turns[0]
    assert conv.turns[0].endswith("                    return True\n\n    return False\n```")


def test_summarize_asks_for_one_sentence_about_the_abstract():
    rows = bench_rows("scitldr_a_test.jsonl")
    conv = next(c for c in take(WorkloadSpec("summarize"), 618) if c.source_id == "scitldr-12")
    assert conv.turns == ["Summarize this abstract in one sentence.\n\n" + " ".join(rows[12]["source"])]
    assert conv.turns[0].startswith("Summarize this abstract in one sentence.\n\nClustering high-dimensional "
                                    "datasets is hard because interpoint distances become less informative")


@pytest.mark.parametrize("name", sorted(GROUNDED))
def test_grounded_workload_reads_data_dir_and_names_the_file_and_line_of_a_bad_row(tmp_path, name):
    file = GROUNDED[name][0]
    good = {"specbench_questions.jsonl": {"question_id": 7, "category": "rag", "turns": ["Given: X. Q?"]},
            "humanevalfix_python.jsonl": {"task_id": "Python/7", "prompt": "def f():\n",
                                          "buggy_solution": "    pass\n"},
            "scitldr_a_test.jsonl": {"source": ["One.", "Two."], "target": ["t"]}}[file]
    path = tmp_path / file
    path.write_text(json.dumps(good) + "\n")
    (conv,) = take(WorkloadSpec(name, data_dir=tmp_path), 1)
    assert conv.source_id == {"spec-bench": "specbench-7", "rag": "specbench-7", "code-edit": "Python/7",
                              "summarize": "scitldr-0"}[name]
    assert conv.turns == [{"spec-bench": "Given: X. Q?", "rag": "Given: X. Q?",
                           "code-edit": "Fix the bug in the following Python function. Reply with the whole "
                                        "corrected function only.\n\n```python\ndef f():\n    pass\n```",
                           "summarize": "Summarize this abstract in one sentence.\n\nOne. Two."}[name]]
    bad = {k: v for k, v in good.items() if k not in ("turns", "buggy_solution", "source")}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(WorkloadError, match=rf"^{re.escape(str(path))}:2: no .*'(turns|buggy_solution|source)'"):
        take(WorkloadSpec(name, data_dir=tmp_path), 1)
    path.write_text("[1, 2]\n")
    with pytest.raises(WorkloadError, match=rf"^{re.escape(str(path))}:1: expected a JSON object"):
        take(WorkloadSpec(name, data_dir=tmp_path), 1)
    path.write_text("")
    with pytest.raises(WorkloadError, match=rf"^{re.escape(str(path))} holds no "):
        take(WorkloadSpec(name, data_dir=tmp_path), 1)
    path.unlink()
    hint = rf"not found; pass --data-dir DIR \(a folder holding {file}\)"
    with pytest.raises(WorkloadError, match=rf"^{re.escape(str(path))} {hint}"):
        take(WorkloadSpec(name, data_dir=tmp_path), 1)
    with pytest.raises(WorkloadError, match=rf"^data directory {re.escape(str(tmp_path / 'nope'))} {hint}"):
        take(WorkloadSpec(name, data_dir=tmp_path / "nope"), 1)


def test_rag_with_no_rag_rows_in_data_dir_is_a_clear_error(tmp_path):
    row = {"question_id": 1, "category": "qa", "turns": ["Q?"]}
    (tmp_path / "specbench_questions.jsonl").write_text(json.dumps(row) + "\n")
    assert [c.source_id for c in take(WorkloadSpec("spec-bench", data_dir=tmp_path), 2)] == ["specbench-1"] * 2
    with pytest.raises(WorkloadError, match="specbench_questions.jsonl holds no rag items"):
        take(WorkloadSpec("rag", data_dir=tmp_path), 1)


def test_grounded_workloads_need_nothing_beside_the_installed_package(tmp_path):
    out = run_in_installed_copy(tmp_path, """
        from leanserve.bench.workloads import GROUNDED_WORKLOADS, WorkloadSpec, iter_conversations
        print(json.dumps({n: len({c.source_id for c in iter_conversations(WorkloadSpec(n), 80)})
                          for n in GROUNDED_WORKLOADS}))
    """, timeout=60)
    assert out == {"spec-bench": 80, "rag": 80, "code-edit": 80, "summarize": 80}
