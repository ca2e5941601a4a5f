"""Constraints against exact computations on tiny models: llguidance regexes, Lark grammars and JSON
Schema (with a final check), partial regexes (AWRS over a regular over-approximation's mask) give the LM
conditioned on the constraint, and AWRS's weight is unbiased."""

import math

import llguidance.numpy as llnp
import numpy as np
import pytest
import regex
import torch

import steer
from exact import complete_sequences
from steer.constraints.checks import awrs, grammar, json_grammar, partial_regex
from steer.constraints import engine
from steer.constraints.patterns import json_schema
from steer.constraints.patterns import regex as regex_mask
from steer.randomness import seed
from steer.context import LMContext

T = 4


@pytest.mark.slow
def test_awrs_weight_is_unbiased_and_its_sample_exact():
    logprobs = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]), 0)
    allowed = {1, 3, 5}
    p = logprobs.exp()
    z = p[list(allowed)].sum().item()
    seed(0)
    n = 20000
    weights, counts, checks = np.empty(n), np.zeros(6), 0
    for k in range(n):
        first = int(torch.multinomial(p, 1)) if k % 2 else None  # the batched round's draw, or none
        token, log_w, c = awrs(logprobs, None, lambda i: i in allowed, first=first)
        weights[k] = math.exp(log_w)
        counts[token] += 1
        checks += c
    se = weights.std() / math.sqrt(n)
    assert abs(weights.mean() - z) < 4 * se, (weights.mean(), z)
    expected = np.zeros(6)
    expected[list(allowed)] = p[list(allowed)].numpy() / z
    assert np.abs(counts / n - expected).max() < 0.015
    assert counts[[0, 2, 4]].sum() == 0
    # Restricted to an earlier restriction, the weight estimates the conditional probability.
    given = torch.tensor([False, True, True, False, False, True])
    cond = p[[1, 5]].sum().item() / p[[1, 2, 5]].sum().item()
    ws = [math.exp(awrs(logprobs, given, lambda i: i in allowed)[1]) for _ in range(8000)]
    assert abs(np.mean(ws) - cond) < 4 * np.std(ws) / math.sqrt(len(ws))


def test_awrs_with_nothing_allowed_kills():
    token, log_w, _ = awrs(torch.log_softmax(torch.zeros(5), 0), None, lambda i: False)
    assert token is None and log_w == float("-inf")


def test_awrs_that_gives_up_falls_back_on_the_tokens_the_check_names():
    """Passing tokens far down the list: with a cap on checks AWRS gives up; a check that names likely
    candidates then gets one of those that pass, drawn in proportion to the LM, weighted by their mass."""
    logits = torch.linspace(8.0, 0.0, 50)
    logprobs = torch.log_softmax(logits, 0)
    passing = {46, 48}

    def accepts(i):
        return i in passing

    token, log_w, _ = awrs(logprobs, None, accepts, max_checks=10)
    assert token is None and log_w == float("-inf")  # nothing named: the particle dies, as before
    accepts.candidates = lambda: [45, 46, 48]
    seed(0)
    drawn = [awrs(logprobs, None, accepts, max_checks=10) for _ in range(400)]
    assert {t for t, _, _ in drawn} == passing
    expected = math.log(sum(math.exp(logprobs[i].item()) for i in passing))
    assert all(abs(w - expected) < 1e-9 for _, w, _ in drawn)
    share = sum(t == 46 for t, _, _ in drawn) / len(drawn)
    p46, p48 = (math.exp(logprobs[i].item()) for i in (46, 48))
    assert abs(share - p46 / (p46 + p48)) < 0.08


class Constrained(steer.Program):
    """Up to T tokens, each observed to satisfy the constraint, then sampled from the LM."""

    def __init__(self, lm, constraint):
        super().__init__()
        self.ctx = LMContext(lm, "")
        self.constraint = constraint

    async def step(self):
        await self.observe(self.ctx.allowed(self.constraint), True)
        token = await self.sample(self.ctx.next_token())
        if token.is_eos or len(self.ctx.generated) >= T:
            self.finish()

    def result(self):
        return tuple(self.ctx.generated)


def exact(lm, prefix_ok, complete_ok):
    """The LM conditioned on every prefix being valid and, at EOS, on the text being complete."""
    eos = next(iter(lm.vocab.eos_ids))
    target = {}
    for seq, logp in complete_sequences(lm, lm.encode(""), T).items():
        ids = [t for t in seq if t != eos]
        texts = [lm.decode(ids[:k]) for k in range(1, len(ids) + 1)]
        if any(lm.vocab.special[t] for t in ids) or not all(prefix_ok(x) for x in texts):
            continue
        if seq[-1] == eos and not complete_ok(lm.decode(ids)):
            continue
        target[seq] = math.exp(logp)
    z = sum(target.values())
    return {k: v / z for k, v in target.items()}, z


CASES = {
    # name: (alphabet, model seed, constraint factory, independent prefix check, independent completion check)
    "regex (llguidance)": ("ab ", 4, lambda: regex_mask(r"(ab|ba)+ ?"),
                        lambda s: regex.fullmatch(r"(ab|ba)+ ?", s, partial=True) is not None,
                        lambda s: regex.fullmatch(r"(ab|ba)+ ?", s) is not None),
    "partial regex (back-reference)": ("ab ", 4, lambda: partial_regex(r"(a|b)\1+ ?"),
                                       lambda s: regex.fullmatch(r"(a|b)\1+ ?", s, partial=True) is not None,
                                       lambda s: regex.fullmatch(r"(a|b)\1+ ?", s) is not None),
    "lark grammar": ("12+*", 3, lambda: grammar('?start: sum\n?sum: prod ("+" prod)*\n?prod: NUM ("*" NUM)*\n'
                                             "NUM: /[12]+/\n"),
                     lambda s: regex.fullmatch(r"[12]+([+*][12]+)*", s, partial=True) is not None,
                     lambda s: regex.fullmatch(r"[12]+([+*][12]+)*", s) is not None),
    # llguidance does not implement "not": the mask allows every integer, the final check refuses these
    "json schema, lenient final check": (
        "12-", 3, lambda: json_schema({"type": "integer", "not": {"enum": [11, 12, 21]}}, lenient=True),
        lambda s: regex.fullmatch(r"-?[12]+", s, partial=True) is not None,
        lambda s: regex.fullmatch(r"-?[12]+", s) is not None and int(s) not in (11, 12, 21)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_posterior_matches_the_exact_conditional(name):
    alphabet, model_seed, make, prefix_ok, complete_ok = CASES[name]
    lm = steer.tiny_model(alphabet, seed=model_seed, temperature=2.0)
    target, z = exact(lm, prefix_ok, complete_ok)
    assert 0.001 < z < 0.9 and len(target) >= 4
    estimate: dict = {}
    for s in range(3):
        post = steer.smc(Constrained(lm, make()), particles=1500, seed=s)
        for k, w in post.distribution().items():
            estimate[k] = estimate.get(k, 0.0) + w / 3
    assert set(estimate) <= set(target), set(estimate) - set(target)
    tv = 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in target.items())
    assert tv < 0.06, tv
    estimates = [math.exp(steer.importance_sampling(Constrained(lm, make()), particles=200, seed=s).log_ml)
                 for s in range(20)]
    assert abs(np.mean(estimates) - z) < 4 * np.std(estimates) / math.sqrt(len(estimates)) + 1e-9


class WithinBudget(steer.Generate):
    """Each token observed to satisfy the constraint, the text ending within `budget` tokens."""

    def __init__(self, lm, constraint, budget):
        super().__init__(lm, "", budget, constraint=constraint)

    def result(self):
        return tuple(self.context.generated)


def ended_within(lm, budget, complete_ok):
    """The LM conditioned on ending (EOS) within `budget` tokens on a complete text."""
    eos = next(iter(lm.vocab.eos_ids))
    target = {seq: math.exp(logp) for seq, logp in complete_sequences(lm, lm.encode(""), budget).items()
              if seq[-1] == eos and complete_ok(lm.decode([t for t in seq if t != eos]))}
    z = sum(target.values())
    return {k: v / z for k, v in target.items()}, z


def assert_exact(program, target: dict, z: float, runs: int, particles: int, sampler=steer.smc) -> None:
    """No particle dies, the posterior over `runs` runs is within 0.05 TV of the exact `target`, and
    exp(log_ml) is an unbiased estimate of `z` (20 importance-sampling runs of 100 particles)."""
    estimate: dict = {}
    for s in range(runs):
        post = sampler(program(), particles=particles, seed=s)
        assert np.isfinite(post.log_weights).all()  # no particle walked into a text that cannot end
        for k, w in post.distribution().items():
            estimate[k] = estimate.get(k, 0.0) + w / runs
    assert set(estimate) <= set(target), set(estimate) - set(target)
    tv = 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in target.items())
    assert tv < 0.05, tv
    estimates = [math.exp(steer.importance_sampling(program(), particles=100, seed=s).log_ml) for s in range(20)]
    assert abs(np.mean(estimates) - z) < 4 * np.std(estimates) / math.sqrt(len(estimates)) + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("pattern,budget,make", [(r"a+bbb", 6, regex_mask), (r"(ab|ba)+ bb", 6, regex_mask),
                                                 (r"(a|b)\1+ bb", 6, partial_regex)])
def test_budget_checks_finish_every_particle_and_keep_the_posterior(pattern, budget, make, monkeypatch):
    """With `max_tokens` the proposals check that each drawn token leaves room to end (a partial regex
    through its regular over-approximation), so no particle dies, and the posterior is still the
    exact conditional."""
    lm = steer.tiny_model("ab ", seed=4, temperature=2.0)
    target, z = ended_within(lm, budget, lambda s: regex.fullmatch(pattern, s) is not None)
    assert len(target) >= 2
    assert_exact(lambda: WithinBudget(lm, make(pattern), budget), target, z, runs=3, particles=1000)
    # without the check, particles walk into texts that cannot end in time
    monkeypatch.setattr(engine.Structured, "token_check", lambda self, context: None)
    post = steer.importance_sampling(WithinBudget(lm, make(pattern), budget), particles=1000, seed=0)
    assert not np.isfinite(post.log_weights).all()


@pytest.mark.slow
def test_a_back_reference_leaves_room_for_its_copy_within_the_budget(monkeypatch):
    """`(a+) \\1` in 7 tokens: the approximation reads `\\1` as any text, so without the copy check
    particles write `aaa` and cannot copy it in time; with it none dies and the posterior is exact."""
    from steer.constraints.checks import PartialRegex

    lm = steer.tiny_model("ab ", seed=4, temperature=2.0)
    pattern, budget = r"(a+) \1", 7
    target, z = ended_within(lm, budget, lambda s: regex.fullmatch(pattern, s) is not None)
    assert len(target) >= 2
    assert_exact(lambda: WithinBudget(lm, partial_regex(pattern), budget), target, z, runs=3, particles=1000)
    monkeypatch.setattr(PartialRegex, "_copies_fit", lambda self, context: None)
    post = steer.importance_sampling(WithinBudget(lm, partial_regex(pattern), budget), particles=1000, seed=0)
    assert not np.isfinite(post.log_weights).all()


@pytest.mark.slow
@pytest.mark.parametrize("make,complete_ok,tv_runs", [
    # (paths through "a" carry heavy-tailed weights here: its posterior is checked through Z only)
    (lambda: steer.masks.must_end_with("b"), lambda s: s.endswith("b"), 0),
    (lambda: steer.masks.word_length(min=2, max=3),
     lambda s: all(2 <= len(w) <= 3 for w in regex.findall(r"[a-z]+", s)), 3),
])
def test_a_budget_makes_masked_proposals_end_in_time(make, complete_ok, tv_runs, monkeypatch):
    """Any mask under a budget: the token before the last is checked (on drawn tokens) to leave a text
    the last token can end, so no particle dies at the budget and the posterior is the exact
    conditional; without the look-ahead particles die there, with a message that names the budget."""
    lm = steer.tiny_model("ab ", seed=4, temperature=2.0)
    budget = 5
    target, z = ended_within(lm, budget, complete_ok)
    assert len(target) >= 4
    estimate: dict = {}
    for s in range(max(tv_runs, 1)):
        post = steer.smc(WithinBudget(lm, make(), budget), particles=1000, seed=s)
        assert np.isfinite(post.log_weights).all()
        for k, w in post.distribution().items():
            estimate[k] = estimate.get(k, 0.0) + w / max(tv_runs, 1)
    assert set(estimate) <= set(target), set(estimate) - set(target)
    if tv_runs:
        tv = 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in target.items())
        assert tv < 0.05, tv
    estimates = [math.exp(steer.importance_sampling(WithinBudget(lm, make(), budget), particles=100,
                                                    seed=s).log_ml) for s in range(20)]
    assert abs(np.mean(estimates) - z) < 4 * np.std(estimates) / math.sqrt(len(estimates)) + 1e-9
    monkeypatch.setattr(steer.masks, "ending_look_ahead", lambda constraint, context: None)
    post = steer.importance_sampling(WithinBudget(lm, make(), budget), particles=1000, seed=0)
    assert not np.isfinite(post.log_weights).all()
    with pytest.raises(steer.ParticlesDiedError, match=r"the token budget ran out: .*max_tokens=2"):
        steer.smc(WithinBudget(lm, steer.masks.word_length(max=3, allow_eos=False), 2), particles=4, seed=0)


@pytest.mark.slow
def test_drawn_tokens_with_no_canonical_continuation_are_refused_and_the_posterior_is_kept(monkeypatch):
    """Where very many tokens are allowed, proposals check that a drawn token has a canonical
    continuation (a lone " " before `[AB]+` has none: " A" is a token), so no particle dies, and the
    posterior is the exact conditional (canonical, matching, ended within the budget)."""
    from steer.constraints.canonical import Canonical

    monkeypatch.setattr(engine, "few_ids", lambda words, limit: None)  # every choice counts as very wide
    lm = steer.tiny_model("AB ", merges=[(" ", "A"), (" ", "B")], seed=4, temperature=2.0)
    budget, pattern = 4, r"( [AB]+)+"
    canon = Canonical.of(lm.vocab)
    eos = next(iter(lm.vocab.eos_ids))
    target = {seq: math.exp(lp) for seq, lp in complete_sequences(lm, lm.encode(""), budget).items()
              if seq[-1] == eos and canon.is_canonical(list(seq[:-1]))
              and regex.fullmatch(pattern, lm.decode(list(seq[:-1])))}
    z = sum(target.values())
    target = {k: v / z for k, v in target.items()}
    assert len(target) >= 4
    lone_space = lm.vocab.strings.index(" ")
    assert_exact(lambda: WithinBudget(lm, regex_mask(pattern), budget), target, z, runs=2, particles=4000,
                 sampler=steer.importance_sampling)
    # without the check, particles draw the lone space and die
    monkeypatch.setattr(engine.Structured, "_continues_check", lambda self, context: None)
    post = steer.importance_sampling(WithinBudget(lm, regex_mask(pattern), budget), particles=1000, seed=0)
    assert not np.isfinite(post.log_weights).all()
    assert any(p.context.generated[:1] == [lone_space] for p in post.particles)


def test_a_budget_no_text_fits_is_reported_before_sampling():
    lm = steer.tiny_model("ab ", seed=4)
    with pytest.raises(steer.SteerError, match="fits in max_tokens"):
        steer.smc(WithinBudget(lm, regex_mask(r"a{6}b"), 4), particles=4, seed=0)


@pytest.mark.parametrize("make,message", [
    (lambda: regex_mask("[a-"), "invalid regular expression '[a-'"),
    (lambda: partial_regex("(?<=a"), "invalid regular expression"),
    (lambda: grammar("start: undefined_rule\n"), "invalid Lark grammar"),
    (lambda: json_schema({"type": "object", "properties": {"a": {"not": {}}}}),
     'Unimplemented keys: ["not"] at $.properties.a'),
    (lambda: json_schema({"type": "object", "properties": {"a": {"type": "tuple"}}}),
     "invalid JSON schema at $.properties.a.type"),
    (lambda: json_schema('{"type": '), "the JSON schema is not valid JSON"),
])
def test_bad_constraints_are_one_line_errors(make, message):
    with pytest.raises(steer.SteerError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_regex_that_needs_look_around_points_to_partial_regex():
    lm = steer.tiny_model("ab")
    with pytest.raises(steer.SteerError, match="partial_regex"):
        regex_mask(r"(?<=a)b").mask(LMContext(lm, ""))


@pytest.mark.parametrize("pattern", [r' (")?\w+(?(1)")', r"(\[)?[a-z]+(?(1)\])", r"(a)?(?(1)b|c)d",
                                     r"(a)?(?(1)[|])e", r"(a)?(?(1)(x|y))z", r"(\w+) \1", r"(?>\d+)-(?=[A-Z])[A-Z]"])
def test_the_regular_part_allows_every_text_the_pattern_does(pattern):
    """The over-approximation AWRS proposes from must contain the pattern's language: a conditional
    without a "no" branch may also match nothing (it once kept only the "yes" branch, so ` abc` never
    ended under `(")?\w+(?(1)")` and every particle that wrote no quote died)."""
    from steer.constraints.checks import regular_part

    part = regex.compile(regular_part(pattern))
    texts = [" abc", ' "abc"', "abc", "[abc]", "ad", "bd", "e", "[e", "|e", "z", "xz", "yz", "ab ab", "12-Q"]
    for text in texts:
        if regex.fullmatch(pattern, text):
            assert part.fullmatch(text), (pattern, text, regular_part(pattern))


def test_a_checked_pattern_before_the_last_token_needs_an_exact_ending():
    """With two tokens left, a drawn token passes only if the exact check lets the text end right
    after it: after `"ab` the over-approximation (the conditional's closing quote optional) would end
    after `a`, the pattern wants the quote."""
    lm = steer.tiny_model('ab"')
    check = partial_regex(r'(")?[ab]+(?(1)")')
    ctx = LMContext(lm, "", heal=False, max_tokens=5)
    ctx.extend([lm.vocab.strings.index(c) for c in '"ab'])
    assert ctx.tokens_left == 2
    test = check.token_check(ctx)
    a, quote = lm.vocab.strings.index("a"), lm.vocab.strings.index('"')
    assert test(quote) and not test(a)
    ctx2 = LMContext(lm, "", heal=False, max_tokens=4)
    ctx2.extend([a, a])  # no opening quote: more letters may end the text
    assert ctx2.tokens_left == 2 and check.token_check(ctx2)(a)


def test_json_grammar_prefixes():
    g = json_grammar()
    for ok in ['{', '{"a"', '{"a": [1, 2.', '{"a": tr', '[', '"x', '-', '{"a": {"b": null}, "c"']:
        assert g.allows(ok), ok
    for bad in ['}', '{"a" 1', '{"a": tx', '[1,,', '01']:
        assert not g.allows(bad), bad
    assert g.allows('{"a": [1, 2.5]}', complete=True) and not g.allows('{"a": [1', complete=True)


def test_a_constraint_no_token_can_meet_ends_with_a_clear_message():
    lm = steer.tiny_model("ab ", seed=1)
    with pytest.raises(steer.ParticlesDiedError) as info:
        steer.smc(Constrained(lm, steer.masks.charset("z")), particles=4, seed=0)
    message = str(info.value)
    assert "no particle satisfied the constraints" in message and "no next token satisfies charset('z')" in message


def test_the_engine_writes_every_word_of_a_mask_buffer():
    """`engine.packed` lets the engine write into an uninitialised buffer: every word must be written
    (a stale bit would allow a token the grammar refuses)."""
    lm = steer.tiny_model("ab ", seed=4)
    matcher = regex_mask(r"(ab|ba)+ ?").matcher(lm.vocab)
    for token in lm.encode("abba", bos=False):
        expected = np.full((1, -(-lm.vocab.size // 32)), -1, dtype=np.int32)
        llnp.fill_next_token_bitmask(matcher, expected, 0)
        garbage = np.full_like(expected, 0x5A5A5A5A)
        assert np.array_equal(engine.packed(matcher, lm.vocab.size, garbage), expected[0])
        assert matcher.consume_token(token)
