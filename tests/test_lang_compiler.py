"""Compiled .steer programs: the same posterior as the equivalent Python program, the exact posterior
on an enumerable model, and the run-time meaning of each statement."""

import math
import re
from collections import Counter

import numpy as np
import pytest
from exact import next_logprobs
from test_exact import NoDoubleB, exact_target

import steer
from steer_lang import LangError, Script

NO_DOUBLE_B = """
context c = ""
prev_b = false
repeat 3:
    if prev_b:
        t = sample next(c) where not one_of(["b"])
    else:
        t = sample next(c)
    prev_b = t == "b"
    if t == "a":
        twist 0.7
    else:
        twist -0.3
    if t == eos or tokens(c) >= 3:
        condition contains(text(c), "a")
        finish
"""


def run_source(source, lm, **options):
    return Script.from_source(source, "test.steer").run(lm, **options)


def test_same_particles_and_weights_as_the_python_program(tiny_lm):
    # (smc-steer is left out: its survivors among children of equal weight depend on the last bit of
    # floating-point rounding, which the two programs reach by different sums; test_exact checks it.)
    for method, options in [("smc", {"ess": 1.0, "resampling": "multinomial"}), ("is", {}),
                            ("smc", {"ess": 0.5, "resampling": "systematic"})]:
        text = run_source(NO_DOUBLE_B, tiny_lm, method=method, particles=64, seed=3, **options)
        kwargs = {"ess_threshold": options["ess"], "resampling": options["resampling"]} if "ess" in options else options
        python = steer.run(NoDoubleB(tiny_lm), method, particles=64, seed=3, **kwargs)
        assert [p.env["c"].generated for p in text.particles] == [p.ctx.generated for p in python.particles]
        np.testing.assert_allclose(text.log_weights, python.log_weights, rtol=0, atol=1e-6)
        assert text.log_ml == pytest.approx(python.log_ml, abs=1e-6)


@pytest.mark.slow
def test_posterior_and_log_ml_match_exact_enumeration(tiny_lm):
    exact, z = exact_target(tiny_lm)
    by_text = Counter()
    for seq, p in exact.items():
        by_text[tiny_lm.decode(list(seq))] += p
    estimate = Counter()
    for seed in range(3):
        post = run_source(NO_DOUBLE_B, tiny_lm, particles=2000, seed=seed)
        for text, w in post.distribution().items():
            estimate[text] += w / 3
    assert set(estimate) <= set(by_text)
    tv = 0.5 * sum(abs(estimate[k] - p) for k, p in by_text.items())
    assert tv < 0.05, tv
    assert abs(post.log_ml - math.log(z)) < 0.05


def test_each_step_moves_every_particle_one_token(tiny_lm):
    post = run_source('context c = ""\nrepeat 5:\n    sample next(c) where not one_of([""], allow_eos=true)\n'
                      "    score 0.1\n", tiny_lm, particles=4, seed=0)
    assert len(post.trace) == 5
    assert all(len(p.env["c"].generated) == 5 for p in post.particles)


def test_control_flow_inputs_and_results(tiny_lm):
    source = """
input n = 4
input name: str
def shout(s, k):
    out = upper(s)
    repeat k:
        out += "!"
    return out
total = 0
repeat 10 as i:
    if i == n:
        stop
    total += i
count = 0
while true max 3:
    count += 1
letters = []
for ch in "abc":
    if ch == "b":
        stop
    letters = letters + [ch]
x = sample categorical(["left", "right"], [0.0, 1.0])
finish
total = -1
result [total, count, letters, shout(name, 2), x, 7 // 2, 7 % 3, 2.0 * 3, "ab"[1], "abcd"[1:3]]
"""
    post = run_source(source, tiny_lm, particles=2, inputs={"name": "hi"})
    assert post.particles[0].result() == (6, 3, ("a",), "HI!!", "right", 3, 1, 6.0, "b", "bc")
    assert Script.from_source(source).input_values({"n": "2", "name": "x"}) == {"n": 2, "name": "x"}


def test_max_tokens_setting_caps_every_particle(tiny_lm):
    source = 'sampler smc(max_tokens = 3)\ncontext c = ""\nrepeat 50:\n    sample next(c) where not one_of([""])\n'
    post = run_source(source, tiny_lm, particles=4)
    assert all(len(p.env["c"].generated) == 3 for p in post.particles)
    post = run_source(source, tiny_lm, particles=4, max_tokens=2)  # an override beats the file
    assert all(len(p.env["c"].generated) == 2 for p in post.particles)


def test_impossible_condition_is_a_clear_error(tiny_lm):
    with pytest.raises(steer.ParticlesDiedError, match="condition at line 3 failed"):
        run_source('context c = ""\nsample next(c)\ncondition false\n', tiny_lm, particles=4)


@pytest.mark.parametrize("source,line,col,fragment", [
    ("x = 1 // 0\n", 1, 7, "division by zero"),
    ('x = "abc"[5]\n', 1, 11, "position 5 is outside a str of length 3"),
    ('x = int("seven")\n', 1, 5, "cannot convert 'seven' to int"),
    ("x = [1, 2]\nif x[0] == 2:\n    y = 2\nz = y + 1\n", 4, 5, "'y' has no value"),
    ('repeat 1 - 2:\n    x = 1\n', 1, 10, "repeat needs a whole number of times >= 0"),
    ('x = matches("a", "(")\n', 1, 5, "bad regular expression"),
    ('x = sample bernoulli(1.5)\n', 1, 12, "Bernoulli probability must lie in [0, 1]"),
    ('context c = ""\nobserve "ab" from next(c)\n', 2, 9, "observe it from continuation(c) instead"),
])
def test_run_time_errors_name_their_place(tiny_lm, source, line, col, fragment):
    with pytest.raises(LangError) as info:
        run_source(source, tiny_lm, particles=2)
    d = info.value.first
    assert (d.line, d.col) == (line, col) and fragment in d.message, str(info.value)


def word_outcomes(lm, words, max_len=16):
    """Exact P(word, next token) for each observed outcome, from plain forward passes."""
    vocab = lm.vocab
    letters = {i for i, s in enumerate(vocab.strings) if s.isalpha() and not vocab.special[i]}
    prompt = lm.encode("")
    probs = {}
    for outcome in words:
        word_ids, nxt = outcome
        seq = list(word_ids) + [nxt]
        logp = sum(next_logprobs(lm, prompt + seq[:i])[t].item() for i, t in enumerate(seq))
        probs[outcome] = math.exp(logp)
    return probs, letters


@pytest.mark.slow
def test_word_sampling_is_an_exact_sample_of_the_model():
    lm = steer.tiny_model("ab ", seed=5, temperature=1.5)
    source = 'context c = "", special = true\nw = sample word(c)\nt = sample next(c)\n'
    n = 4000
    post = run_source(source, lm, method="is", particles=n, seed=1)
    assert np.allclose(post.log_weights, 0.0)  # drawn from the model itself: nothing to correct
    outcomes = Counter()
    for p in post.particles:
        generated = p.env["c"].generated
        outcomes[(tuple(generated[:-1]), generated[-1])] += 1
        # The word is the first token plus the letters that continue it; the next token does not.
        word, nxt = generated[:-1], generated[-1]
        assert p.env["w"] == lm.decode(word)
        if lm.decode(word[-1:]).isalpha():
            assert not lm.decode([nxt]).isalpha() or nxt in lm.vocab.eos_ids
    exact, _ = word_outcomes(lm, outcomes)
    for outcome, count in outcomes.most_common(8):
        p = exact[outcome]
        assert abs(count / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (outcome, count / n, p)
    assert sum(exact.values()) > 0.9  # the observed outcomes carry nearly all of the mass


def test_an_end_string_ends_the_text_for_ended(tiny_lm):
    """A particle whose budget runs out on a token that writes the end string has ended: `ended(c)`
    says so, and the condition kills no particle (it killed those particles when only end-of-text
    counted)."""
    source = ('context c = "a", end = "b", max_tokens = 3\n'
              "repeat 3:\n"
              "    t = sample next(c)\n"
              "    if t == eos:\n"
              "        stop\n"
              "condition ended(c)\n"
              "result text(c)\n")
    posterior = run_source(source, tiny_lm, particles=64, seed=0)
    ended_by_string = [p for p in posterior.particles if p.env["c"].end_at is not None]
    assert ended_by_string, "no particle wrote the end string: the test says nothing"
    assert all(np.isfinite(posterior.log_weights)), "a particle that ended at its end string was killed"


def test_words_are_runs_of_letters_and_exact_word_counts(tiny_lm):
    source = ('x = [word_count("don\'t stop"), has_words("The Cat sat", ["cat", "sat"]), '
              'has_words("cats", ["cat"])]\n'
              "result x\n")
    assert run_source(source, tiny_lm, particles=1).particles[0].value == (3, True, False)
    lm = steer.tiny_model("ab ", seed=4, temperature=2.0)
    source = ('context c = "", max_tokens = 12\n'
              "repeat 12:\n"
              "    t = sample next(c) where max_words(2, min=2)\n"
              "    if t == eos:\n"
              "        stop\n"
              "condition ended(c)\n"
              "result text(c)\n")
    posterior = run_source(source, lm, particles=32, seed=0)
    finished = [p.value for p, w in zip(posterior.particles, posterior.log_weights) if np.isfinite(w)]
    assert finished and all(len(re.findall(r"[a-z]+", t)) == 2 for t in finished), finished


def test_done_says_a_pattern_is_complete():
    lm = steer.tiny_model("ab ", seed=4, temperature=2.0)
    source = ('p = regex("(ab){2}")\n'
              'context c = ""\n'
              "repeat 8:\n"
              "    t = sample next(c) where p\n"
              "    if done(p, c):\n"
              "        stop\n"
              "result text(c)\n")
    posterior = run_source(source, lm, particles=8, seed=0)
    assert {p.value for p in posterior.particles} == {"abab"}
    with pytest.raises(LangError, match="done\\(\\) needs a regex"):
        run_source('context c = ""\nx = done(word_length(max=2), c)\nresult x\n', lm, particles=1)
