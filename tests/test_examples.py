"""The paper's example programs, on the real default model."""

import re
import sys
from pathlib import Path

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
