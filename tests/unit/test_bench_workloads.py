"""Workloads: counts, seeded repeatability, history re-sent, shared prefix shared, length ranges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leanserve.bench.workloads import (
    WorkloadError,
    WorkloadSpec,
    approx_tokens,
    build_messages,
    iter_conversations,
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


@pytest.mark.parametrize("name", ["chat", "multi-turn", "shared-prefix", "random"])
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
