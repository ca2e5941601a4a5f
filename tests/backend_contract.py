"""The contract every backend keeps (`steer.lm.base.LanguageModel` and `ModelState`), checked the same
way for each: the transformers and in-test backends in `test_backends.py`, vLLM in `test_vllm.py`."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from steer.context import LMContext
from steer.lm.base import LanguageModel, Vocabulary
from steer.scheduler import run_batched


def _served(*contexts: LMContext) -> None:
    async def all_of():
        return [await c.next_logprobs() for c in contexts]

    run_batched([all_of()])


def check_backend_contract(lm: LanguageModel, text: str, tolerance: float = 1e-4) -> None:
    """`text`: a short string the model's vocabulary can write (at least 4 tokens)."""
    assert isinstance(lm, LanguageModel) and isinstance(lm.vocab, Vocabulary)
    vocab = lm.vocab
    assert vocab.special.shape == (vocab.size,) and vocab.eos_ids and lm.max_length > 0
    ids = lm.encode(text, bos=False)
    assert len(ids) >= 4 and lm.decode(ids) == text
    assert lm.particle_bytes(10) > 0

    # One batched round serves every asked context: normalised float32 log-probabilities, a few draws.
    a, b, same = LMContext(lm, text, heal=False), LMContext(lm, text[:2], heal=False), LMContext(lm, text, heal=False)
    _served(a, b, same)
    for ctx in (a, b, same):
        lp = ctx.logprobs
        assert lp.dtype == torch.float32 and lp.shape == (vocab.size,)
        assert abs(torch.logsumexp(lp.double(), 0).item()) < 1e-3
        assert ctx.draw is None or all(0 <= d < vocab.size for d in ctx.draw)
    assert torch.allclose(a.logprobs, same.logprobs, atol=tolerance)

    # A scored extension is the sum of the token-by-token log-probabilities of the same tokens.
    stepwise, scored = LMContext(lm, text[:2], heal=False), copy.deepcopy(b)
    total = 0.0
    for token in ids[-3:]:
        _served(stepwise)
        total += stepwise.logprobs[token].item()
        stepwise.extend([token])

    result = []

    async def score():
        result.append(await scored.extend_scored(ids[-3:]))

    run_batched([score()])
    assert math.isclose(result[0], total, abs_tol=10 * tolerance)

    # A copy moves on its own: after the same extension it agrees with a fresh context of those tokens.
    fork = copy.deepcopy(a)
    fork.extend([ids[0]])
    a.extend([ids[1]])
    fresh_fork, fresh_a = (LMContext(lm, list(c.tokens)) for c in (fork, a))
    _served(fork, a, fresh_fork, fresh_a)
    assert torch.allclose(fork.logprobs, fresh_fork.logprobs, atol=tolerance)
    assert torch.allclose(a.logprobs, fresh_a.logprobs, atol=tolerance)
    assert not torch.allclose(fork.logprobs, a.logprobs) or ids[0] == ids[1]

    # Released state is forgotten, and the context is served again from its tokens.
    before = a.logprobs.clone()
    lm.release(a)
    assert a.backend_state is None
    a.logprobs = None
    _served(a)
    assert np.allclose(a.logprobs.numpy(), before.numpy(), atol=tolerance)
