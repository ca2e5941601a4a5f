"""The shared KV cache gives the same next-token log-probs as a plain full-sequence forward pass."""

import copy

import pytest
import torch

import steer
from exact import next_logprobs
from steer.scheduler import run_batched
from steer.context import LMContext


async def refresh(ctx):
    await ctx.next_logprobs()


def assert_matches_full_forward(lm, contexts, tol=1e-4):
    for ctx in contexts:
        assert ctx.logprobs is not None
        diff = (ctx.logprobs - next_logprobs(lm, ctx.tokens)).abs().max().item()
        assert diff < tol, f"{ctx.tokens}: max |diff| = {diff}"


def exercise(lm, prompts, steps):
    """Prompts of different lengths, ragged extensions, deep copies (resampling) and a fresh context."""
    contexts = [LMContext(lm, p, heal=False) for p in prompts]
    run_batched([refresh(c) for c in contexts])
    assert_matches_full_forward(lm, contexts)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        # resample: drop the last context, copy the first twice
        contexts = [contexts[0], copy.deepcopy(contexts[0])] + contexts[1:-1] + [copy.deepcopy(contexts[1])]
        for i, c in enumerate(contexts):
            n = 1 + (i + step) % 3  # ragged: 1 to 3 new tokens per context
            c.extend(torch.randint(2, lm.vocab.size, (n,), generator=g).tolist())
        if step == 1:
            contexts.append(LMContext(lm, prompts[0]))
        run_batched([refresh(c) for c in contexts])
        assert_matches_full_forward(lm, contexts)
    return contexts


def test_tiny_model_cache_matches_full_forward(tiny_lm):
    calls = tiny_lm.forward_calls
    exercise(tiny_lm, ["ab", "b", "abba"], steps=4)
    assert tiny_lm.forward_calls - calls == 5  # one batched forward per round


def test_prompt_is_encoded_once_for_many_particles(tiny_lm):
    contexts = [LMContext(tiny_lm, "abab", heal=False) for _ in range(50)]
    run_batched([refresh(c) for c in contexts])
    assert tiny_lm._mask.shape[0] == 1  # one cache row for 50 identical contexts
    for c in contexts:
        c.extend([2])
    run_batched([refresh(c) for c in contexts])
    assert tiny_lm._mask.shape == (1, 6)  # still one row: identical particles are computed once


def test_scored_extension_equals_sum_of_next_token_logprobs(tiny_lm):
    ctx = LMContext(tiny_lm, "ab", heal=False)
    tokens = [2, 3, 3, 2]

    async def go():
        return await ctx.extend_scored(tokens)

    out = {}

    async def run():
        out["score"] = await go()

    run_batched([run()])
    prefix = tiny_lm.encode("ab")
    expected = sum(next_logprobs(tiny_lm, prefix + tokens[:i])[t].item() for i, t in enumerate(tokens))
    assert abs(out["score"] - expected) < 1e-4


@pytest.mark.slow
def test_gemma_cache_matches_full_forward(gemma):
    contexts = exercise(gemma, ["The capital of France is", "Once upon a time", "1 2 3"], steps=3)
    assert len(contexts) == 3 + 3 + 1  # each round copies one context more; one fresh context joins


@pytest.mark.slow
def test_gemma_in_bfloat16_stays_close_to_float32(gemma):
    """--dtype bfloat16 on the transformers backend: the likely next tokens keep their float32
    log-probabilities within 0.3 nats, and log-softmax stays in float32."""
    bf16 = steer.load_model(dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    prompts = ["The capital of France is", "Once upon a time"]
    pairs = [(LMContext(bf16, p, heal=False), LMContext(gemma, p, heal=False)) for p in prompts]
    run_batched([refresh(c) for pair in pairs for c in pair])
    for low, full in pairs:
        assert low.logprobs.dtype == torch.float32
        likely = full.logprobs > -4.6  # p > 1%
        assert (low.logprobs[likely] - full.logprobs[likely]).abs().max() < 0.3
