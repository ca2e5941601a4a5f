"""The paper's example programs, on the real default model."""

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import steer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

pytestmark = pytest.mark.slow


def test_short_words(gemma):
    from short_words import ShortWords

    post = steer.smc(ShortWords(gemma, "My favorite writing style is", max_tokens=16), particles=4, seed=0)
    texts = [p.ctx.text for p, w in zip(post.particles, post.weights) if w > 0]
    for text in texts:
        assert all(len(word) <= 5 for word in re.findall(r"[^\W\d_]+", text)), text
    assert any(re.search(r"[^\W\d_]", text) for text in texts)
    assert post.log_ml < 0  # the constraint has probability below one under the model


def test_infilling(gemma):
    from infilling import Infill

    segments = ["The Eiffel Tower is", " tall and was built", " 1889."]
    post = steer.smc(Infill(gemma, segments, max_gap=4), particles=4, seed=0)
    for text, _ in post.top(4):
        assert text.startswith(segments[0]) and text.endswith(segments[2])
        assert text.index(segments[1]) > len(segments[0])
    assert post.log_ml > float("-inf")


def test_prompt_intersection(gemma):
    from prompt_intersection import Intersection

    post = steer.run(Intersection(gemma, ["My favorite physicist is", "My favorite writer is"], max_tokens=6),
                     "smc-steer", particles=3, beam=2, seed=0)
    for particle in post.particles:
        a, b = particle.contexts
        assert a.generated == b.generated and 1 <= len(a.generated) <= 6
    assert post.log_ml > float("-inf")


def test_retrieved_passages_as_separate_contexts(gemma, wiki_index, minilm):
    from retrieval_contexts import retrieval_program

    from retrieval.retriever import Retriever

    retriever = Retriever.load(wiki_index, embedder=minilm)
    program = retrieval_program(gemma, retriever, "What does anarchism advocate?", k=2, max_tokens=4)
    hits = retriever.search("What does anarchism advocate?", 2)
    prompts = [gemma.decode(c.tokens[:c.prompt_length]) for c in program.contexts]
    assert len(prompts) == 2
    for prompt, hit in zip(prompts, hits):
        assert prompt.endswith(f"Background: {hit.text}\n\nQuestion: What does anarchism advocate?\nAnswer:")
    posterior = steer.run(program, "smc", particles=2, seed=0)
    assert math.isfinite(posterior.log_ml) and all(len(p.contexts[0].generated) <= 4 for p in posterior.particles)

    mixture = retrieval_program(gemma, retriever, "What does anarchism advocate?", k=2, max_tokens=3, combine="mixture")
    scores = np.array([h.score for h in hits]) / 0.05
    np.testing.assert_allclose(mixture.mixture.weights, np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum())
    posterior = steer.run(mixture, "smc", particles=2, seed=0)
    assert abs(posterior.log_ml) < 1e-6  # sampled from the mixture itself: every weight is 1
    for p in posterior.particles:  # posterior context weights: prior x likelihood of what was generated
        assert np.isclose(p.mixture.weights.sum(), 1) and len(p.mixture.generated) <= 3
