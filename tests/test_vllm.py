"""The vLLM backend: agreement with the transformers backend on the default model (prompts, ragged
extensions, copies, resampling, scored extensions), SMC end to end, the peer tasks, sessions freed,
and the exact-enumeration check on a tiny model.

vLLM lives in a second environment (`bash scripts/install-vllm.sh`; see the README for why); where it
is not installed these tests are reported as skipped with that reason.
"""

from __future__ import annotations

import copy
import gc
import math
import re

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: `bash scripts/install-vllm.sh` makes "
                                   ".venv-vllm, where `.venv-vllm/bin/python -m pytest -n 0 tests/test_vllm.py` runs these")

import steer  # noqa: E402
from backend_contract import check_backend_contract  # noqa: E402
from steer.context import LMContext  # noqa: E402
from steer.scheduler import run_batched  # noqa: E402

pytestmark = pytest.mark.slow

# Stated tolerance: same weights, same dtype (float32), different kernels.  Over every token the
# transformers backend gives a probability above 1e-4, log-probabilities differ by at most this:
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def engines():
    """The default model in float32 on both backends (one vLLM engine per module: it is slow to start)."""
    vllm_lm = steer.load_model(backend="vllm", dtype="float32")
    yield vllm_lm, steer.load_model()
    vllm_lm.close()


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    likely = b > -9.2  # p > 1e-4
    return (a[likely] - b[likely]).abs().max().item()


async def refresh(ctx):
    await ctx.next_logprobs()


def test_vllm_keeps_the_backend_contract(engines):
    check_backend_contract(engines[0], "The cat sat on the mat.", tolerance=TOLERANCE)


def test_next_token_logprobs_agree_after_extensions_copies_and_resampling(engines):
    vllm_lm, hf_lm = engines
    prompts = ["The capital of France is", "Once upon a time", "1 2 3"]
    pairs = [(LMContext(vllm_lm, p, heal=False), LMContext(hf_lm, p, heal=False)) for p in prompts]
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for step in range(4):
        run_batched([refresh(c) for pair in pairs for c in pair])
        for v, h in pairs:
            assert v.tokens == h.tokens
            worst = max(worst, max_difference(v.logprobs, h.logprobs))
        # resample: drop the last pair, copy the first twice; then ragged extensions of 1 to 3 tokens
        pairs = [pairs[0], tuple(copy.deepcopy(c) for c in pairs[0])] + pairs[1:-1] + \
                [tuple(copy.deepcopy(c) for c in pairs[1])]
        for i, (v, h) in enumerate(pairs):
            tokens = torch.multinomial(h.logprobs.exp(), 1 + (i + step) % 3, replacement=True,
                                       generator=generator).tolist()
            v.extend(tokens)
            h.extend(tokens)
        if step == 1:
            pairs.append((LMContext(vllm_lm, prompts[0]), LMContext(hf_lm, prompts[0])))
    assert worst < TOLERANCE, f"max |log p difference| = {worst}"


def test_identical_copies_are_served_once_and_dead_sessions_are_freed(engines):
    vllm_lm, _ = engines
    contexts = [LMContext(vllm_lm, "The history of the city begins", heal=False) for _ in range(8)]
    run_batched([refresh(c) for c in contexts])
    sessions = {id(c.backend_state) for c in contexts}
    assert len(sessions) == 1  # eight particles on one prompt: one engine request
    for i, c in enumerate(contexts):
        c.extend([int(c.logprobs.topk(2).indices[i % 2])])
    run_batched([refresh(c) for c in contexts])
    assert len({id(c.backend_state) for c in contexts}) == 2  # two distinct continuations
    del contexts, c
    gc.collect()
    vllm_lm.advance([])  # aborts what nobody holds
    scheduler = vllm_lm.engine.engine_core.engine_core.scheduler
    assert not scheduler.requests


def test_a_diverged_copy_reencodes_only_what_its_parent_holds_in_a_partial_block(engines):
    """Prefix caching gives a new session its parent's full cache blocks, so a resampled copy that
    took another token costs at most a block's worth of tokens, not its whole text."""
    vllm_lm, _ = engines
    block = vllm_lm.engine.vllm_config.cache_config.block_size
    if vllm_lm.engine.vllm_config.device_config.device_type == "cpu":
        assert block == 32  # steer's CPU default: vLLM's own 128 would share nothing below 128 tokens
    parent = LMContext(vllm_lm, "The history of the city begins with a small fishing village on the shore "
                             "of a wide river, where traders from the north and the south met every "
                             "spring to exchange salt, grain and wool for the fish of the river", heal=False)
    assert len(parent.tokens) > block + 8
    run_batched([refresh(parent)])
    child = copy.deepcopy(parent)
    first, second = parent.logprobs.topk(2).indices.tolist()
    parent.extend([first])
    child.extend([second])
    scheduler = vllm_lm.engine.engine_core.engine_core.scheduler
    schedule, scheduled = scheduler.schedule, []

    def counting(*args, **kwargs):
        output = schedule(*args, **kwargs)
        scheduled.append(output.total_num_scheduled_tokens)
        return output

    scheduler.schedule = counting
    try:
        run_batched([refresh(parent), refresh(child)])
    finally:
        del scheduler.schedule
    assert parent.backend_state is not child.backend_state
    # the parent appends one token; the copy encodes what lies past the last full block, and its token
    assert sum(scheduled) <= 1 + len(child.tokens) % block + block
    assert sum(scheduled) < len(child.tokens)


def test_scored_extension_matches_transformers(engines):
    vllm_lm, hf_lm = engines
    tokens = hf_lm.encode(" rose over the hills", bos=False)
    scores = {}

    async def score(name, lm):
        ctx = LMContext(lm, "The sun", heal=False)
        scores[name] = await ctx.extend_scored(tokens)

    run_batched([score("vllm", vllm_lm)])
    run_batched([score("hf", hf_lm)])
    assert abs(scores["vllm"] - scores["hf"]) < TOLERANCE * len(tokens)
    assert scores["hf"] < -1.0  # a real score, not an empty sum


def short_words(lm):
    """The peer task `hard`: every word at most five letters."""
    return steer.Generate(lm, "My favorite writing style is", 10, mask=steer.masks.word_length(max=5))


def test_constrained_smc_runs_on_vllm_with_the_same_weights_as_transformers(engines):
    vllm_lm, hf_lm = engines
    posterior = steer.smc(short_words(vllm_lm), particles=6, seed=0)
    for text in posterior.distribution():
        assert all(len(word) <= 5 for word in re.findall(r"[^\W\d_]+", text)), text  # words: runs of letters
    # the weight of each particle is the same number under the other backend, within the tolerance
    reference = steer.smc(short_words(hf_lm), particles=6, seed=0)
    assert abs(posterior.log_ml - reference.log_ml) < 0.05


def test_plain_sampling_gives_equal_weights(engines):
    vllm_lm, _ = engines

    class Plain(steer.Program):
        def __init__(self, lm):
            super().__init__()
            self.ctx = LMContext(lm, "Once upon a time", heal=False, canonical=False, allow_special=True)

        async def step(self):
            token = await self.sample(self.ctx.next_token())
            if token.is_eos or len(self.ctx.generated) >= 8:
                self.finish()

    posterior = steer.smc(Plain(vllm_lm), particles=8, seed=1)
    assert max(posterior.weights) - min(posterior.weights) < 1e-9
    assert len(posterior.distribution()) > 1  # the particles really differ


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The exactness tests' tiny model (4 tokens) on both backends, float32; its heads are 32 wide,
    the narrowest vLLM's CPU attention takes."""
    path = tmp_path_factory.mktemp("tiny-vllm")
    hf_lm = steer.tiny_model("ab", seed=2, temperature=2.0, hidden=64, max_length=64)
    hf_lm.model.save_pretrained(path)
    hf_lm.tokenizer.save_pretrained(path)
    return path, hf_lm


def test_tiny_model_posterior_and_log_ml_match_enumeration(engines, tiny_pair):
    from test_exact import NoDoubleB, exact_target

    engines[0].close()  # one engine at a time in a process
    path, hf_lm = tiny_pair
    vllm_lm = steer.load_model(path, backend="vllm", dtype="float32", max_model_len=64)
    try:
        exact, z = exact_target(hf_lm)  # enumerated with the transformers model of the same weights
        estimate: dict = {}
        for seed in range(3):
            posterior = steer.smc(NoDoubleB(vllm_lm), particles=2000, seed=seed)
            for k, w in posterior.distribution().items():
                estimate[k] = estimate.get(k, 0.0) + w / 3
        assert set(estimate) <= set(exact), "a sample violates the constraint"
        assert 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in exact.items()) < 0.05

        def z_hat(seed):
            try:
                return math.exp(steer.smc(NoDoubleB(vllm_lm), particles=64, seed=seed).log_ml)
            except steer.ParticlesDiedError:
                return 0.0

        estimates = torch.tensor([z_hat(s) for s in range(200)], dtype=torch.float64)
        se = estimates.std().item() / math.sqrt(len(estimates))
        assert abs(estimates.mean().item() - z) < 3 * se + 1e-12
        assert se < 0.1 * z
    finally:
        vllm_lm.close()
