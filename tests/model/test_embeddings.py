"""Prompt embeddings (SamplingParams.embed, /v1/embeddings) on the real SmolLM2-135M: the mean of the
prompt's final hidden states, L2-normalized, the same however the prompt is chunked or batched and
whatever the prefix cache holds."""

from __future__ import annotations

import pytest
import torch

from leanserve.engine.engine import LLM
from leanserve.model.attention import AttentionMetadata
from leanserve.types import SamplingParams
from tests.conftest import mt_bench_prompts
from tests.model.helpers import new_kv_caches

pytestmark = pytest.mark.model

EMBED = SamplingParams(max_tokens=1, temperature=0.0, embed=True)


@torch.inference_mode()
def reference(loaded, ids: list[int]) -> torch.Tensor:
    """The whole prompt in one forward over fresh blocks, mean of the rows, normalized."""
    model = loaded.model
    kv = new_kv_caches(model, 64, 16, dtype=loaded.dtype)
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [list(range(-(-len(ids) // 16)))], 16,
                                   set(model.cfg.layer_windows))
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), meta, kv).float()
    mean = hidden.mean(0)
    return mean / mean.norm()


@pytest.fixture(scope="module")
def prompts(smollm2_f32):
    return [smollm2_f32.tokenizer.encode(p) for p in mt_bench_prompts(3)]


def test_embedding_is_the_normalized_mean_of_the_final_hidden_states(smollm2_f32, prompts):
    llm = LLM("smollm2-135m", loaded=smollm2_f32)
    outs = llm.generate(prompts, EMBED, use_tqdm=False)  # batched together
    for ids, out in zip(prompts, outs):
        got = torch.tensor(out.embedding)
        assert got.shape == (smollm2_f32.config.hidden_size,)
        torch.testing.assert_close(got, reference(smollm2_f32, ids), atol=2e-5, rtol=0)
        assert out.num_cached_tokens == 0


def test_chunked_and_cached_prompts_embed_the_same(smollm2_f32, prompts):
    want = [torch.tensor(o.embedding) for o in LLM("smollm2-135m", loaded=smollm2_f32).generate(
        prompts, EMBED, use_tqdm=False)]
    chunked = LLM("smollm2-135m", loaded=smollm2_f32, max_num_batched_tokens=40)
    chunked.generate(prompts, SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)  # fills the prefix cache
    outs = chunked.generate(prompts, EMBED, use_tqdm=False)
    for w, out in zip(want, outs):
        assert out.num_cached_tokens == 0  # every prompt token computed: its hidden state is needed
        torch.testing.assert_close(torch.tensor(out.embedding), w, atol=2e-5, rtol=0)
    chunked.engine.scheduler.check_integrity()
    assert chunked.engine.runner.pooled == {}  # nothing left behind
