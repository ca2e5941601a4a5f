"""Canonical tokenization: the pair test against the tokenizer itself, and SMC under canonicality
against exact enumeration on a tiny BPE model whose merged tokens make non-canonical sequences."""

import itertools
import math
import random

import numpy as np
import pytest
import regex as re

import steer
from exact import complete_sequences
from steer.constraints.canonical import Canonical
from steer.context import LMContext

MERGES = {
    "small": [(" ", "a"), ("a", "b"), ("b", "b"), (" a", "b")],
    "chained": [("a", "b"), ("b", "b"), ("b", "a"), ("ab", "a"), (" ", "b"), ("a", "a"), ("aa", "a"),
                (" b", "ba")],
}


@pytest.fixture(scope="module")
def bpe_lm():
    """Tokens <eos> <bos> a b " " " a" ab bb " ab": " " then "a" is never what the tokenizer writes."""
    return steer.tiny_model("ab ", merges=MERGES["small"], seed=3, temperature=1.5, max_length=64)


def encodes_to_itself(tokenizer, vocab, ids) -> bool:
    return tokenizer.encode("".join(vocab.strings[i] for i in ids), add_special_tokens=False) == list(ids)


@pytest.mark.parametrize("merges", list(MERGES))
def test_pair_test_agrees_with_the_tokenizer_on_every_short_sequence(merges):
    lm = steer.tiny_model("ab ", merges=MERGES[merges], seed=1)
    vocab, canon = lm.vocab, Canonical(lm.vocab, cache=False)
    text_ids = range(2, vocab.size)
    disagree = [seq for n in range(1, 5) for seq in itertools.product(text_ids, repeat=n)
                if canon.is_canonical(list(seq)) != encodes_to_itself(lm.tokenizer, vocab, seq)]
    assert not disagree
    assert not canon.is_canonical(lm.encode("a", bos=False) + lm.encode("b", bos=False))  # "ab" is one token
    for b in text_ids:  # `before` is `after` read the other way, and `follows` reads the sparse table
        assert [bool(canon.before(b)[a]) for a in text_ids] == [canon.pair(a, b) for a in text_ids]
        assert [canon.follows(b, c) for c in range(vocab.size)] == canon.after(b).tolist()


def test_a_tokenizer_without_merges_is_trivially_canonical(tiny_lm):
    canon = Canonical(tiny_lm.vocab, cache=False)
    assert canon.trivial and canon.after(2).all()


@pytest.mark.slow
def test_gemma_pairs_agree_with_the_tokenizer(gemma):
    vocab, canon = gemma.vocab, Canonical.of(gemma.vocab)
    one = lambda s: gemma.encode(s, bos=False)[0]  # noqa: E731
    assert not canon.pair(one(" "), one("("))          # " (" is one token
    assert canon.pair(one(" at"), one(" ("))
    assert not canon.pair(one("\n"), one("\n"))       # "\n\n" is an added token
    assert canon.pair(one(" "), one("<strong>"))       # added tokens are matched whole: canonical
    assert vocab.special[255999]                       # <start_of_image> is a control token
    rng = random.Random(0)
    texts = np.flatnonzero(canon.alone & ~vocab.special)
    common = gemma.encode("Call me at (555) 123-4567. The movie was great, wasn't it? Once upon a time", bos=False)
    pairs = [(rng.choice(common) if k % 2 else int(rng.choice(texts)), int(rng.choice(texts))) for k in range(600)]
    disagree = [(vocab.strings[a], vocab.strings[b]) for a, b in pairs
                if canon.pair(a, b) != encodes_to_itself(gemma.tokenizer, vocab, (a, b))]
    assert not disagree
    # `follows` (the sparse table, ids or packed bits) agrees with `after`, left-out tokens included
    for a in {a for a, _ in pairs[:40]} | {one(" "), one("\n")}:
        after = canon.after(a).numpy()
        probe = np.concatenate([np.flatnonzero(~after)[:200], rng.sample(range(vocab.size), 200)])
        assert [canon.follows(a, int(b)) for b in probe] == after[probe].tolist()
    # the look-ahead's table of probes that may follow a token (built from `before`) agrees with `follows`
    from steer.constraints.engine import _one_character_tokens, _probes_after

    probes = _one_character_tokens(vocab)
    assert len(probes) > 10
    for a in [a for a, _ in pairs[:300]] + [one(" "), one("\n"), one("("), one("5")]:
        follows = [y for y in probes if canon.follows(a, y)]  # one token per character: the first
        assert _probes_after(vocab, canon, a) == [y for k, y in enumerate(follows)
                                                  if vocab.strings[y] not in {vocab.strings[z] for z in follows[:k]}]


# -- SMC under canonicality against exact enumeration -------------------------------------------
T = 3


class Constrained(steer.Program):
    def __init__(self, lm, prompt, constraint):
        super().__init__()
        self.ctx = LMContext(lm, prompt)
        self.constraint = constraint

    async def step(self):
        if self.constraint is not None:
            await self.observe(self.ctx.allowed(self.constraint), True)
        token = await self.sample(self.ctx.next_token())
        if token.is_eos or len(self.ctx.generated) >= T:
            if isinstance(self.constraint, steer.checks.TokenCheck):  # a check judges prefixes only
                self.condition(bool(re.fullmatch(PATTERN, self.ctx.text)) or not token.is_eos)
            self.finish()

    def result(self):
        return tuple(self.ctx.generated)


PATTERN = r"a* ?b+a?"
A_RUNS = r"a+( a+)?"
CONSTRAINTS = {
    "none": lambda: None,
    "mask": lambda: steer.masks.exclude_chars("b"),
    "regex": lambda: steer.patterns.regex(PATTERN),
    "automaton": lambda: steer.patterns.automaton(PATTERN),
    "check": lambda: steer.checks.partial_regex(PATTERN),
}
INSIDE_TOKEN = {  # for the end string "b", which "ab" and " ab" write after some text
    "a-runs": lambda: steer.patterns.regex(A_RUNS),
    "no-a": lambda: steer.masks.exclude_chars("a"),
}


def allowed_text(kind, text, ended):
    if kind == "mask":
        return "b" not in text
    if kind == "no-a":
        return "a" not in text
    if kind in ("regex", "automaton", "check", "a-runs"):
        pattern = A_RUNS if kind == "a-runs" else PATTERN
        return bool(re.fullmatch(pattern, text)) if ended else bool(re.fullmatch(pattern, text, partial=True))
    return True


def exact(lm, prompt, kind):
    """The LM conditioned on canonical tokens, no control tokens, healing and the constraint."""
    ctx = LMContext(lm, prompt)
    eos = next(iter(lm.vocab.eos_ids))
    canon = Canonical(lm.vocab, cache=False)
    heal_ids = [i for i, s in enumerate(lm.vocab.strings) if ctx.healed and s.startswith(ctx.healed)
                and not lm.vocab.special[i]]
    first = complete_sequences(lm, ctx.tokens, 1)
    heal_mass = sum(math.exp(first[(i,)]) for i in heal_ids) if ctx.healed else 1.0
    target = {}
    for seq, logp in complete_sequences(lm, ctx.tokens, T).items():
        body = [t for t in seq if t != eos]
        if any(lm.vocab.special[t] for t in body) or not canon.is_canonical([ctx.tokens[-1], *body]):
            continue
        if ctx.healed and seq[0] not in heal_ids:
            continue
        text = lm.decode(body)[len(ctx.healed):]
        if allowed_text(kind, text, ended=seq[-1] == eos):
            target[seq] = math.exp(logp)
    z = sum(target.values())
    return {k: v / z for k, v in target.items()}, z / heal_mass


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["ab", "b a "])
@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_smc_under_canonicality_matches_enumeration(bpe_lm, prompt, kind):
    posterior, z = exact(bpe_lm, prompt, kind)
    assert 0 < z < 1 and len(posterior) >= 4
    estimate: dict = {}
    for seed in range(3):
        post = steer.smc(Constrained(bpe_lm, prompt, CONSTRAINTS[kind]()), particles=1500, seed=seed)
        for k, w in post.distribution().items():
            estimate[k] = estimate.get(k, 0.0) + w / 3
    assert set(estimate) <= set(posterior), "a sample outside the canonical, constrained support"
    tv = 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in posterior.items())
    assert tv < 0.05
    # exp(log_ml) is unbiased for the normaliser (relative to the healed prompt's text)
    values = [math.exp(steer.smc(Constrained(bpe_lm, prompt, CONSTRAINTS[kind]()), particles=20,
                                 seed=100 + s).log_ml) for s in range(40)]
    mean, se = np.mean(values), np.std(values, ddof=1) / math.sqrt(len(values))
    assert abs(mean - z) < 3 * se + 1e-9


def test_unconstrained_weights_only_differ_by_non_canonical_mass(bpe_lm):
    """With no constraint each step's weight is the mass of the canonical next tokens: nearly equal
    weights, and no particle ever holds a non-canonical pair."""
    post = steer.importance_sampling(Constrained(bpe_lm, "b a ", None), particles=200, seed=0)
    canon = Canonical(bpe_lm.vocab, cache=False)
    for p in post.particles:
        body = [t for t in p.ctx.tokens[1:] if t not in bpe_lm.vocab.eos_ids]
        assert canon.is_canonical(body)


# -- end strings ---------------------------------------------------------------------------------
class UntilEnd(Constrained):
    def __init__(self, lm, prompt, constraint, end=" "):
        steer.Program.__init__(self)
        self.ctx = LMContext(lm, prompt, end=end, heal=False)
        self.constraint = constraint


def exact_until_end(lm, prompt, kind, end=" "):
    """Enumerate sequences that stop at EOS, at a token writing the end string, or after T tokens."""
    from exact import next_logprobs

    base = LMContext(lm, prompt, end=end, heal=False)
    canon = Canonical(lm.vocab, cache=False)
    eos = next(iter(lm.vocab.eos_ids))
    target = {}

    def walk(seq, logp):
        ctx = LMContext(lm, prompt, end=end, heal=False)
        ctx.extend(seq)
        if seq and (seq[-1] == eos or ctx.ended or len(seq) == T):
            ok = allowed_text(kind, ctx.text, ended=seq[-1] == eos or ctx.ended)
            if ok and canon.is_canonical([base.tokens[-1], *[t for t in seq if t != eos]]):
                target[tuple(seq)] = math.exp(logp)
            return
        lp = next_logprobs(lm, base.tokens + seq)
        for t in range(lm.vocab.size):
            if not lm.vocab.special[t] or t == eos:
                walk(seq + [t], logp + lp[t].item())

    walk([], 0.0)
    z = sum(target.values())
    return {k: v / z for k, v in target.items()}, z


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["none", "regex", "check"])
def test_end_strings_end_the_text_and_constraints_judge_the_text_before_them(bpe_lm, kind):
    posterior, z = exact_until_end(bpe_lm, "b", kind)
    estimate: dict = {}
    for seed in range(3):
        post = steer.smc(UntilEnd(bpe_lm, "b", CONSTRAINTS[kind]()), particles=1500, seed=seed)
        for p in post.particles:
            assert " " not in p.ctx.text and (p.ctx.ended or len(p.ctx.generated) == T or
                                               p.ctx.generated[-1] in bpe_lm.vocab.eos_ids)
        for k, w in post.distribution().items():
            estimate[k] = estimate.get(k, 0.0) + w / 3
    assert set(estimate) <= set(posterior)
    assert 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in posterior.items()) < 0.05
    ended = sum(p for k, p in posterior.items() if " " in bpe_lm.decode(list(k)))
    assert ended > 0.2  # the end string is what ends most texts here


class WithinBudget(Constrained):
    def __init__(self, lm, prompt, constraint):
        steer.Program.__init__(self)
        self.ctx = LMContext(lm, prompt, end=" ", heal=False, max_tokens=T)
        self.constraint = constraint


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["none", "regex", "automaton"])
def test_a_token_budget_makes_every_text_end_within_it(bpe_lm, kind):
    """`max_tokens=T`: texts end (EOS or the end string) within T tokens; the posterior is the exact one
    over such texts.  The automaton leaves out every token after which no full match fits, so no
    particle dies; llguidance's regex checks this only before the budget's last token, so a particle
    may die there, and those that live have ended."""
    posterior, z = exact_until_end(bpe_lm, "b", kind)
    eos = next(iter(bpe_lm.vocab.eos_ids))
    ended = {k: p for k, p in posterior.items() if k[-1] == eos or " " in bpe_lm.decode(list(k))}
    total = sum(ended.values())
    ended = {k: p / total for k, p in ended.items()}
    estimate: dict = {}
    for seed in range(3):
        post = steer.smc(WithinBudget(bpe_lm, "b", CONSTRAINTS[kind]()), particles=1500, seed=seed)
        for p, logw in zip(post.particles, post.log_weights):
            assert p.ctx.ended or p.ctx.generated[-1] == eos or (kind == "regex" and logw == -np.inf)
        for k, w in post.distribution().items():
            estimate[k] = estimate.get(k, 0.0) + w / 3
    assert set(estimate) <= set(ended)
    assert 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in ended.items()) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["a-runs", "no-a"])
def test_an_end_string_inside_a_token_judges_the_text_it_adds_before_it(bpe_lm, kind):
    """End string "b": the token "ab" writes "a" then ends the text, so the constraint judges "a" as
    text that ends there (a mask too, whose end-of-text entry alone would not see the "a")."""
    posterior, _ = exact_until_end(bpe_lm, "b", kind, end="b")
    estimate: dict = {}
    for seed in range(3):
        post = steer.smc(UntilEnd(bpe_lm, "b", INSIDE_TOKEN[kind](), end="b"), particles=1500, seed=seed)
        for k, w in post.distribution().items():
            estimate[k] = estimate.get(k, 0.0) + w / 3
    assert set(estimate) <= set(posterior)
    assert 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in posterior.items()) < 0.05
    ab = bpe_lm.encode("ab", bos=False)[0]
    through_ab = sum(p for k, p in posterior.items() if ab in k)
    assert through_ab > 0.05 if kind == "a-runs" else through_ab == 0  # "ab" adds an "a": excluded
