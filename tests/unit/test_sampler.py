"""Sampler semantics pinned with hand-built logits; every random check is seeded, so deterministic."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from leanserve import kernels
from leanserve.sampling import Sampler, SamplingRow, apply_top_k_top_p_min_p, process_logits
from leanserve.sampling.sampler import token_logprobs
from leanserve.types import SamplingParams

NEG_INF = float("-inf")
EOS = 3


def make_row(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
    **params: object,
) -> SamplingRow:
    sp = SamplingParams(**params)  # type: ignore[arg-type]
    if generator is None and sp.seed is not None:
        generator = torch.Generator().manual_seed(sp.seed)
    return SamplingRow(sp, list(prompt or []), list(output or []), generator)


def rand_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draw(logits_row: torch.Tensor, n: int, **params: object) -> Counter[int]:
    """n draws for one logits row: n rows sharing one seeded generator (each row draws from it in turn)."""
    g = torch.Generator().manual_seed(1234)
    rows = [make_row(generator=g, **params) for _ in range(n)]
    out = Sampler(logits_row.shape[-1], [EOS])(logits_row.expand(n, -1), rows)
    return Counter(out.token_ids)


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_equals_argmax(dtype: torch.dtype) -> None:
    logits = rand_logits(7, 50).to(dtype)
    rows = [make_row(temperature=0.0) for _ in range(6)] + [make_row(temperature=0.8, top_k=1)]
    out = Sampler(50, [EOS])(logits, rows)
    assert out.token_ids == logits.float().argmax(-1).tolist()
    assert out.logprobs == [None] * 7


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_plain_greedy_batch_is_one_argmax() -> None:
    logits = rand_logits(4, 30).to(torch.bfloat16)
    rows = [make_row(temperature=0.0, seed=i, prompt=[1, 2]) for i in range(4)]
    with _RecordOps() as rec:
        out = Sampler(30, [EOS])(logits, rows)
    # one reduction: the native argmax_rows when the kernels are on, else max's indices (see _argmax)
    assert rec.ops == (["leanserve.argmax_rows.default"] if kernels.ops() is not None else ["aten.max.dim"])
    assert out.token_ids == logits.float().argmax(-1).tolist()


def test_greedy_uses_processed_logits() -> None:
    logits = rand_logits(3, 40, seed=5)
    rows = [
        make_row(temperature=0.0, output=[int(logits[0].argmax())], repetition_penalty=5.0),
        make_row(temperature=0.0, logit_bias={7: 100.0}),
        make_row(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0, output=[1, 2, 2]),
    ]
    out = Sampler(40, [EOS])(logits, rows)
    assert out.token_ids == process_logits(logits, rows, [EOS]).argmax(-1).tolist()
    assert out.token_ids[0] != int(logits[0].argmax())
    assert out.token_ids[1] == 7


# ---------------------------------------------------------------- logit_bias / min_tokens


def test_logit_bias_changes_argmax_and_exact_values() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.5]])
    plain = Sampler(5, [EOS])(logits, [make_row(temperature=0.0)])
    assert plain.token_ids == [2]
    row = make_row(temperature=0.0, logit_bias={0: 5.0, 2: -1.5, 99: 50.0})  # 99: past the width, ignored
    assert process_logits(logits, [row], [EOS]).tolist() == [[6.0, 2.0, 1.5, 0.0, 0.5]]
    assert Sampler(5, [EOS])(logits, [row]).token_ids == [0]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_blocks_eos_and_stop_ids_until_reached(ignore_eos: bool) -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 10.0, 0.0]])  # EOS (3) best, stop id 2 next
    sampler = Sampler(5, [EOS])

    def step(output: list[int]) -> tuple[int, list[float]]:
        row = make_row(temperature=0.0, min_tokens=2, stop_token_ids=[2], ignore_eos=ignore_eos, output=output)
        return sampler(logits, [row]).token_ids[0], process_logits(logits, [row], [EOS])[0].tolist()

    for output in ([], [1]):
        tok, proc = step(output)
        assert tok == 1
        assert proc == [0.0, 1.0, NEG_INF, NEG_INF, 0.0]
    tok, proc = step([1, 1])
    assert tok == EOS
    assert proc == logits[0].tolist()


def test_min_tokens_only_affects_its_own_row() -> None:
    logits = torch.tensor([[0.0, 1.0, 10.0, 9.0], [0.0, 1.0, 10.0, 9.0]])
    rows = [make_row(temperature=0.0, min_tokens=1), make_row(temperature=0.0)]
    assert Sampler(4, [2, EOS])(logits, rows).token_ids == [1, 2]


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_positive_and_negative_exact() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 4.0, 3.0]])
    # token 0: prompt, positive -> /2; token 1: output, negative -> *2; token 5 in both -> once only.
    row = make_row(prompt=[0, 5, 5], output=[1, 5], repetition_penalty=2.0)
    assert process_logits(logits, [row], [EOS]).tolist() == [[1.0, -4.0, 1.0, -1.0, 4.0, 1.5]]
    # penalty < 1 rewards repeats, same rule
    row = make_row(prompt=[0], output=[1], repetition_penalty=0.5)
    assert process_logits(logits, [row], [EOS]).tolist() == [[4.0, -1.0, 1.0, -1.0, 4.0, 3.0]]


def test_presence_and_frequency_penalties_exact() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0]])
    # output counts: 1 -> 3, 2 -> 1; token 3 only in the prompt: untouched (output tokens only).
    row = make_row(prompt=[3, 3], output=[1, 1, 2, 1], presence_penalty=0.5, frequency_penalty=0.25)
    assert process_logits(logits, [row], [EOS]).tolist() == [[0.0, -1.25, -0.75, 0.0, 0.0]]
    row = make_row(output=[4], presence_penalty=-1.0, frequency_penalty=-0.5)  # negative: encourage
    assert process_logits(logits, [row], [EOS]).tolist() == [[0.0, 0.0, 0.0, 0.0, 1.5]]


def test_penalty_order_bias_then_repetition_then_frequency_presence() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    row = make_row(
        output=[0, 0], logit_bias={0: 2.0}, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25
    )
    # (2 + 2) / 2 - 0.5 * 2 - 0.25 = 0.75
    assert process_logits(logits, [row], [EOS]).tolist() == [[0.75, 0.0, 0.0]]


def test_penalties_batched_equal_per_row() -> None:
    logits = rand_logits(4, 30, seed=3)
    rows = [
        make_row(prompt=[1, 2, 3], output=[4, 4, 5], repetition_penalty=1.3),
        make_row(prompt=[9], output=[], frequency_penalty=1.0),
        make_row(prompt=[1, 2], output=[2, 7, 7, 7]),  # no penalties: untouched
        make_row(prompt=[0, 29], output=[28, 0], repetition_penalty=0.7, presence_penalty=-0.4, frequency_penalty=0.3),
    ]
    batched = process_logits(logits, rows, [EOS])
    for i, row in enumerate(rows):
        torch.testing.assert_close(batched[i : i + 1], process_logits(logits[i : i + 1], [row], [EOS]), rtol=0, atol=0)
    assert torch.equal(batched[2], logits[2])


# ---------------------------------------------------------------- top-k / top-p / min-p


def test_top_k_exact_set_and_support() -> None:
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 2.5, 0.0, 1.0, -2.0]])
    masked = apply_top_k_top_p_min_p(logits, torch.tensor([3]), None, None)
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [1, 3, 4]
    assert torch.equal(masked[0, [1, 3, 4]], logits[0, [1, 3, 4]])
    for disabled in (-1, 0, 8, 9):
        assert torch.equal(apply_top_k_top_p_min_p(logits, torch.tensor([disabled]), None, None), logits)
    counts = draw(logits[0], 3000, top_k=3, temperature=1.5)
    assert set(counts) == {1, 3, 4}


def test_top_k_keeps_ties_with_kth() -> None:
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    masked = apply_top_k_top_p_min_p(logits, torch.tensor([1]), None, None)
    assert torch.isfinite(masked[0]).tolist() == [False, True, True, False]


def test_top_p_exact_sets() -> None:
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])  # sorted: 1 (0.4), 3 (0.3), 2 (0.2), 0 (0.1)
    logits = probs.log().expand(4, -1)
    top_p = torch.tensor([0.05, 0.6, 0.75, 1.0])
    kept = torch.isfinite(apply_top_k_top_p_min_p(logits, None, top_p, None))
    assert [row.nonzero().flatten().tolist() for row in kept] == [[1], [1, 3], [1, 2, 3], [0, 1, 2, 3]]
    assert set(draw(probs.log(), 2000, top_p=0.6)) == {1, 3}


def test_top_p_disabled_row_keeps_whole_large_vocab() -> None:
    logits = rand_logits(2, 100_000, seed=9)
    masked = apply_top_k_top_p_min_p(logits, None, torch.tensor([1.0, 0.5]), None)
    assert torch.equal(masked[0], logits[0])
    assert 0 < int(torch.isfinite(masked[1]).sum()) < 100_000


def test_min_p_exact_sets() -> None:
    probs = torch.tensor([0.15, 0.5, 0.1, 0.25])
    logits = probs.log().expand(3, -1)
    kept = torch.isfinite(apply_top_k_top_p_min_p(logits, None, None, torch.tensor([0.0, 0.1, 0.4])))
    assert [row.nonzero().flatten().tolist() for row in kept] == [[0, 1, 2, 3], [0, 1, 2, 3], [1, 3]]
    assert set(draw(probs.log(), 2000, min_p=0.4)) == {1, 3}


def test_top_k_top_p_min_p_per_row_in_one_batch() -> None:
    probs = torch.tensor([0.05, 0.35, 0.1, 0.3, 0.2])  # order: 1, 3, 4, 2, 0
    logits = probs.log().expand(4, -1)
    kept = torch.isfinite(
        apply_top_k_top_p_min_p(
            logits,
            torch.tensor([4, -1, 0, 2]),
            torch.tensor([1.0, 0.7, 1.0, 1.0]),
            torch.tensor([0.0, 0.0, 0.5, 0.0]),
        )
    )
    assert [row.nonzero().flatten().tolist() for row in kept] == [[1, 2, 3, 4], [1, 3, 4], [1, 3, 4], [1, 3]]


# ---------------------------------------------------------------- random sampling


def test_empirical_distribution_matches_softmax() -> None:
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    n = 20_000
    for temperature in (1.0, 0.7):
        counts = draw(logits, n, temperature=temperature)
        expected = torch.softmax(logits / temperature, -1) * n
        chi2 = sum((counts[i] - float(expected[i])) ** 2 / float(expected[i]) for i in range(5))
        assert chi2 < 18.47, (temperature, chi2, counts)  # df = 4, p = 0.001


def test_unseeded_rows_follow_softmax_too() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0]).expand(30_000, -1)
    counts = Counter(Sampler(3, [EOS])(logits, [make_row() for _ in range(30_000)]).token_ids)
    expected = torch.softmax(logits[0], -1) * 30_000
    chi2 = sum((counts[i] - float(expected[i])) ** 2 / float(expected[i]) for i in range(3))
    assert chi2 < 13.82  # df = 2, p = 0.001


def test_higher_temperature_spreads_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0])

    def entropy(counts: Counter[int]) -> float:
        total = sum(counts.values())
        return -sum(c / total * math.log(c / total) for c in counts.values())

    cold, warm, hot = (draw(logits, 4000, temperature=t) for t in (0.3, 1.0, 2.0))
    assert entropy(cold) < entropy(warm) < entropy(hot)
    assert cold[0] > warm[0] > hot[0]


def _run_seeded(seed: int, batch_builder: object, steps: int = 15) -> list[int]:
    """Run `steps` decode steps of one seeded row inside batches built by batch_builder(step)."""
    vocab = 64
    target_logits = rand_logits(steps, vocab, seed=42)
    g = torch.Generator().manual_seed(seed)
    history: list[int] = []
    for s in range(steps):
        others: list[tuple[torch.Tensor, SamplingRow]] = batch_builder(s)  # type: ignore[operator]
        pos = s % (len(others) + 1)
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        me = (target_logits[s], SamplingRow(params, [1, 2], list(history), g))
        batch = others[:pos] + [me] + others[pos:]
        out = Sampler(vocab, [EOS])(torch.stack([lg for lg, _ in batch]), [row for _, row in batch])
        history.append(out.token_ids[pos])
    return history


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    vocab = 64

    def alone(_: int) -> list[tuple[torch.Tensor, SamplingRow]]:
        return []

    def crowded(s: int) -> list[tuple[torch.Tensor, SamplingRow]]:
        lg = rand_logits(4, vocab, seed=100 + s)
        return [
            (lg[0], make_row(temperature=0.0)),
            (lg[1], make_row(temperature=1.2, top_k=5)),
            (lg[2], make_row(seed=7, temperature=0.9, output=[1, 1])),
            (lg[3], make_row(temperature=1.0, repetition_penalty=1.5, output=[3])),
        ][: 1 + s % 4]

    def seeded_neighbours(s: int) -> list[tuple[torch.Tensor, SamplingRow]]:
        lg = rand_logits(2, vocab, seed=200 + s)
        return [(lg[0], make_row(seed=5)), (lg[1], make_row(seed=5, min_p=0.1))]

    reference = _run_seeded(11, alone)
    assert _run_seeded(11, crowded) == reference
    assert _run_seeded(11, seeded_neighbours) == reference


def test_different_seeds_differ() -> None:
    def alone(_: int) -> list[tuple[torch.Tensor, SamplingRow]]:
        return []

    runs = {tuple(_run_seeded(seed, alone)) for seed in range(4)}
    assert len(runs) == 4


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_with_ordered_top() -> None:
    logits = rand_logits(4, 20, seed=8).to(torch.bfloat16)
    rows = [
        # processing must not leak into the reported logprobs
        make_row(temperature=0.0, logprobs=5, logit_bias={0: 30.0}, repetition_penalty=2.0, output=[1]),
        make_row(temperature=0.5, logprobs=0, seed=3),
        make_row(temperature=0.0),
        make_row(temperature=1.0, logprobs=20, top_k=4, seed=4),
    ]
    out = Sampler(20, [EOS])(logits, rows)
    ref = torch.log_softmax(logits.float(), -1)
    assert out.token_ids[0] == 0  # sampled from processed logits
    assert out.logprobs[2] is None
    for i, n in ((0, 5), (1, 0), (3, 20)):
        lp = out.logprobs[i]
        assert lp is not None
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == float(ref[i, lp.token_id])
        assert len(lp.top) == n
        expected_ids = ref[i].argsort(descending=True)[:n].tolist()
        assert [t for t, _ in lp.top] == expected_ids
        assert [v for _, v in lp.top] == [float(ref[i, t]) for t in expected_ids]
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))


# ---------------------------------------------------------------- mixed batch / shape


def test_mixed_batch_greedy_random_seeded() -> None:
    vocab = 32
    logits = rand_logits(5, vocab, seed=21)
    rows = [
        make_row(temperature=0.0),
        make_row(temperature=1.0, top_k=3),
        make_row(temperature=0.8, seed=99),
        make_row(temperature=0.0, frequency_penalty=2.0, output=[int(logits[3].argmax())] * 3),
        make_row(temperature=1.3, seed=17, logprobs=2, top_p=0.5),
    ]
    out = Sampler(vocab, [EOS])(logits, rows)
    proc = process_logits(logits, rows, [EOS])
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] in logits[1].topk(3).indices.tolist()
    assert out.token_ids[3] == int(proc[3].argmax()) != int(logits[3].argmax())
    # seeded rows equal their solo runs
    for i, seed in ((2, 99), (4, 17)):
        solo_row = make_row(**{**rows[i].params.__dict__, "seed": seed})
        assert Sampler(vocab, [EOS])(logits[i : i + 1], [solo_row]).token_ids == [out.token_ids[i]]
    assert [lp is None for lp in out.logprobs] == [True, True, True, True, False]


def test_logits_wider_than_vocab_and_bad_shape() -> None:
    sampler = Sampler(8, [EOS])
    logits = torch.zeros(1, 10)
    logits[0, 9] = 5.0  # padded lm_head column: the sampler works on the full width
    assert sampler(logits, [make_row(temperature=0.0, logit_bias={9: 1.0})]).token_ids == [9]
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 10), [make_row()])
    assert sampler(torch.zeros(0, 10), []).token_ids == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_picks_the_first_maximum_like_torch_argmax(dtype):
    from leanserve.sampling.sampler import _argmax

    x = torch.randn(64, 49152, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[3, [10, 500, 40000]] = 100.0  # ties: the first wins
    x[5, 20000:] = 100.0
    x[7, 9] = float("nan")  # NaN counts as the maximum, as in argmax
    assert torch.equal(_argmax(x), x.argmax(dim=-1))
    assert _argmax(x)[3].item() == 10 and _argmax(x)[5].item() == 20000 and _argmax(x)[7].item() == 9


# ---------------------------------------------------------------- bounds: a row can only fail itself

def test_top_k_past_the_vocabulary_is_off_and_does_not_fail_the_batch() -> None:
    logits = rand_logits(2, 50, seed=3)
    rows = [make_row(temperature=1.0, top_k=2**31 - 1, seed=1), make_row(temperature=1.0, top_k=5, seed=2)]
    out = Sampler(50, [EOS])(logits, rows)  # int64 overflow of a huge top_k failed the whole step before
    off = Sampler(50, [EOS])(logits[:1], [make_row(temperature=1.0, seed=1)])
    assert out.token_ids[0] == off.token_ids[0]
    assert out.token_ids[1] in logits[1].topk(5).indices.tolist()


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 1e-12])
def test_a_top_p_that_rounds_to_zero_keeps_the_best_token(top_p: float) -> None:
    logits = rand_logits(4, 64, seed=5)
    rows = [make_row(temperature=1.0, top_p=top_p, seed=i) for i in range(4)]
    assert Sampler(64, [EOS])(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 9e-6])
def test_a_temperature_below_the_epsilon_is_greedy(temperature: float) -> None:
    logits = rand_logits(3, 64, seed=6)
    rows = [make_row(temperature=temperature, seed=i) for i in range(3)]
    assert all(r.params.greedy for r in rows)
    assert Sampler(64, [EOS])(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("field,value", [
    ("top_k", 2**63), ("top_k", -2), ("repetition_penalty", 1e-300), ("repetition_penalty", 0.0),
    ("temperature", 2.5), ("temperature", float("inf")), ("top_p", 0.0), ("n", 17), ("seed", 2**64),
    ("logprobs", 21), ("presence_penalty", float("nan")), ("max_tokens", 2**40), ("stop", ("x" * 1025,)),
    ("stop_token_ids", (-1,)), ("logit_bias", {1: 1e9}), ("temperature", True),
])
def test_sampling_params_refuse_what_the_server_refuses(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_token_logprobs_equal_log_softmax_with_ranks_and_top():
    logits = torch.tensor([[2.0, 1.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0], [-1e4, 5.0, 4.0, 5.0]])
    got = token_logprobs(logits, [1, 2, 3], top_n=2)
    ref = torch.log_softmax(logits, dim=-1)
    assert [g.token_id for g in got] == [1, 2, 3]
    assert [g.logprob for g in got] == pytest.approx([ref[0, 1].item(), ref[1, 2].item(), ref[2, 3].item()], abs=1e-6)
    # rank: 1 + tokens strictly likelier; ties share the better rank
    assert [g.rank for g in got] == [3, 1, 1]
    assert [t for t, _ in got[0].top] == [2, 0]
    assert [v for _, v in got[0].top] == pytest.approx([ref[0, 2].item(), ref[0, 0].item()], abs=1e-6)
    assert token_logprobs(logits, [0, 0, 0])[0].top == []
    bf = token_logprobs(logits.to(torch.bfloat16), [1, 2, 3])  # bf16 logits are scored in float32
    assert [g.logprob for g in bf] == pytest.approx([g.logprob for g in got], abs=1e-2)
