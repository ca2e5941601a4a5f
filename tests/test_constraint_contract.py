"""The contract every constraint keeps through the one protocol (`steer.constraints.base`): masks,
the llguidance engine, AWRS checks, tilts and their combinations, on a tiny BPE vocabulary.

Along random walks: the mask is a bool tensor over the vocabulary (or None) and the tilt a finite
float64 one (or None); the tokens that pass the mask and the token check are exactly those that a
decode-and-check of the text allows (where the constraint can judge text); a constraint is an immutable
spec that copies of a particle share; `~c` is the complement of an exact mask and is refused for a
checked constraint; and a sampler needs no other entry point: one SMC step through `ctx.allowed(c)`
works for every kind."""

import copy
import random

import pytest
import regex
import torch

import steer
from steer.constraints import checks, engine
from steer.constraints.base import NOTHING_FITS, AllOf, Constraint
from steer.context import LMContext
from steer.errors import SteerError

MERGES = [("a", "b"), ("b", "a"), (" ", "a")]
ALPHABET = "ab 1"


@pytest.fixture(scope="module")
def lm():
    return steer.tiny_model(ALPHABET, merges=MERGES, seed=0)


def _words_at_most(n):
    return lambda s: all(len(w) <= n for w in regex.findall(r"[a-z]+", s))


CONSTRAINTS = {  # name: (constraint, a reference on text prefixes, or None where the mask is its own)
    "word_length": (lambda: steer.masks.word_length(max=2), _words_at_most(2)),
    "charset": (lambda: steer.masks.charset("ab "), lambda s: set(s) <= set("ab ")),
    "banned_words": (lambda: steer.masks.banned_words(["ab"]), None),
    "regex": (lambda: engine.regex(r"(ab|ba)+( 1)?"),
              lambda s: regex.fullmatch(r"(ab|ba)+( 1)?", s, partial=True) is not None),
    "json_schema": (lambda: engine.json_schema({"enum": [1, 11]}), None),
    "partial_regex": (lambda: checks.partial_regex(r"(a|b)\1+ 1"),
                      lambda s: regex.fullmatch(r"(a|b)\1+ 1", s, partial=True) is not None),
    "lark_grammar": (lambda: checks.lark_grammar('start: WORD (" " WORD)*\nWORD: /[ab]+/\n'),
                     lambda s: regex.fullmatch(r"[ab]+( [ab]+)*", s, partial=True) is not None),
    "prefer_words": (lambda: steer.tilts.prefer_words(["ab"], 1.5), None),
    "mask_and_tilt": (lambda: steer.masks.word_length(max=2) & steer.tilts.prefer_words(["ab"]),
                      _words_at_most(2)),
    "check_and_mask": (lambda: checks.partial_regex(r"(a|b)\1+ 1") & steer.masks.charset("ab 1"),
                       lambda s: regex.fullmatch(r"(a|b)\1+ 1", s, partial=True) is not None),
}


def passing(constraint: Constraint, ctx) -> set[int]:
    """Every token the mask and the token check let through."""
    mask = constraint.allowed_in(ctx)
    check = constraint.token_check(ctx)
    ids = range(ctx.lm.vocab.size) if mask is None else torch.nonzero(mask).flatten().tolist()
    return {i for i in ids if check is None or check(i)} if check is not NOTHING_FITS else set()


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_every_constraint_keeps_the_protocol_on_random_walks(lm, name):
    make, reference = CONSTRAINTS[name]
    constraint = make()
    assert isinstance(constraint, Constraint)
    rng = random.Random(0)
    vocab = lm.vocab
    for walk in range(3):
        ctx = LMContext(lm, "", canonical=False)
        for _ in range(6):
            mask = constraint.allowed_in(ctx)
            assert mask is None or (mask.dtype == torch.bool and mask.shape == (vocab.size,))
            tilt = constraint.tilt(ctx)
            assert tilt is None or (tilt.dtype == torch.float64 and torch.isfinite(tilt).all())
            assert (tilt is not None) == (name in ("prefer_words", "mask_and_tilt"))
            ok = passing(constraint, ctx)
            if reference is not None:
                want = {i for i, s in enumerate(vocab.strings)
                        if not vocab.special[i] and i not in vocab.eos_ids and reference(ctx.text + s)}
                assert ok - set(vocab.eos_ids) == want, (name, ctx.text)
            assert constraint.restricts or ok == set(range(vocab.size))
            text_tokens = sorted(i for i in ok if i not in vocab.eos_ids and not vocab.special[i])
            if not text_tokens:
                break
            ctx.extend([rng.choice(text_tokens)])


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_a_constraint_is_a_spec_that_copies_share_and_negation_follows_exactness(lm, name):
    constraint = CONSTRAINTS[name][0]()
    assert copy.deepcopy(constraint) is constraint
    ctx = LMContext(lm, "", canonical=False)
    if constraint.exact and constraint.restricts and constraint.tilt(ctx) is None:
        inverse = (~constraint).allowed_in(ctx)
        assert torch.equal(inverse, ~constraint.allowed_in(ctx))
    elif not constraint.exact:
        with pytest.raises(SteerError, match="cannot be negated"):
            ~constraint


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_one_smc_step_observes_every_kind_through_the_same_entry_point(lm, name):
    constraint = CONSTRAINTS[name][0]()
    reference = CONSTRAINTS[name][1]

    @steer.program
    async def step(p, ctx):
        if constraint.restricts:
            await p.observe(ctx.allowed(constraint), True)
        await p.sample(ctx.next_token(tilt=constraint))
        p.finish()

    posterior = steer.smc(step(ctx=LMContext(lm, "", canonical=False)), particles=6, seed=1)
    assert all(w >= 0 for w in posterior.weights) and abs(sum(posterior.weights) - 1) < 1e-9
    for particle, weight in zip(posterior.particles, posterior.weights):
        ctx = particle.state["ctx"]
        if weight > 0 and reference is not None and not ctx.ended:
            assert reference(ctx.text), (name, ctx.text)


def test_and_flattens_and_or_is_for_masks_only():
    both = AllOf(steer.masks.charset("ab"), AllOf(steer.masks.word_length(max=2), steer.tilts.prefer_words(["ab"])))
    assert len(both.parts) == 3 and both.exact
    with pytest.raises(SteerError, match="only masks combine with `or`"):
        steer.masks.charset("ab") | steer.tilts.prefer_words(["ab"])
    assert not (checks.partial_regex("a+") & steer.masks.charset("a")).exact
