"""Every examples/*.steer program on the real default model, its output checked independently."""

import math
import re
from pathlib import Path

import pytest
import torch

from steer_lang import Script

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name, lm, **options):
    script = Script.from_file(EXAMPLES / f"{name}.steer")
    post = script.run(lm, seed=0, **options)
    live = [(p, w) for p, w in zip(post.particles, post.weights) if w > 0]
    assert live and math.isfinite(post.log_ml)
    return script, post, live


def test_every_example_is_tested():
    tested = {"short_words", "infilling", "prompt_intersection", "date_format", "required_words",
              "soft_preference"}
    assert {p.stem for p in EXAMPLES.glob("*.steer")} == tested


def test_short_words(gemma):
    _, _, live = run("short_words", gemma, particles=4, inputs={"max_tokens": 12})
    for p, _ in live:
        words = re.findall(r"[^\W\d_]+", p.result())
        assert words and max(map(len, words)) <= 5, p.result()


def test_infilling(gemma):
    script, _, live = run("infilling", gemma, particles=3, inputs={"max_gap": 3})
    segments = script.input_values()["segments"]
    for p, _ in live:
        text = p.result()
        assert text.startswith(segments[0]) and text.endswith(segments[-1])
        positions = [text.find(s) for s in segments]
        assert positions == sorted(positions) and positions[1] > len(segments[0]), text


def test_prompt_intersection_weights_are_the_second_prompts_likelihood(gemma):
    script, _, live = run("prompt_intersection", gemma, method="is", particles=3, inputs={"max_tokens": 5})
    second = script.input_values()["second"]
    for p, _ in live:
        generated = p.env["a"].generated
        assert p.env["b"].generated == generated and 1 <= len(generated) <= 5
        ids = gemma.encode(second) + generated
        with torch.no_grad():
            logp = torch.log_softmax(gemma.model(torch.tensor([ids])).logits[0].float(), -1)
        n = len(gemma.encode(second))
        expected = sum(logp[n - 1 + i, t].item() for i, t in enumerate(generated))
        assert p.weight == pytest.approx(expected, abs=2e-3)


def test_date_format(gemma):
    _, _, live = run("date_format", gemma, particles=3)
    for p, _ in live:
        assert re.fullmatch(r" \d{4}-\d{2}-\d{2}", p.result()), p.result()


def test_required_words(gemma):
    script, _, live = run("required_words", gemma, particles=3, inputs={"max_gap": 3})
    required = script.input_values()["required"]
    for p, _ in live:
        pattern = r".*".join(rf"\b{re.escape(w)}\b" for w in required)
        assert re.search(pattern, p.result(), re.DOTALL), p.result()


def test_soft_preference_weight_is_the_final_score_only(gemma):
    # Common words, so that twists and scores are certainly non-zero along the way.
    common = ["the", "a", "we", "and", "to", "of", "in", "on", "at", "our", "it", "was"]
    script, _, live = run("soft_preference", gemma, method="is", particles=3,
                          inputs={"max_tokens": 8, "favourite": common})
    bonus = script.input_values()["bonus"]
    hits = []
    for p, _ in live:
        hits.append(sum(w in common for w in re.findall(r"[^\W\d_]+(?:'[^\W\d_]+)*", p.result().lower())))
        assert p.weight == pytest.approx(bonus * hits[-1], abs=1e-9)  # every twist was taken back
    assert max(hits) > 0
