"""The contract every llguidance constraint keeps, on a tiny BPE vocabulary: the allowed tokens agree
with a decode-and-check reference along random walks (never more; fewer only where forced text has a
longer token), copies made by resampling move independently, and end-of-text is allowed exactly on
complete text."""

import copy
import random

import pytest
import regex
import torch

import steer
from steer.constraints import engine
from steer.context import LMContext

MERGES = [("a", "b"), ("{", '"'), ('"', ":"), (":", " "), ("1", "2")]
ALPHABET = 'ab{}":, 12'


@pytest.fixture(scope="module")
def lm():
    return steer.tiny_model(ALPHABET, merges=MERGES, seed=0)


CONSTRAINTS = {
    "regex": lambda: engine.regex(r"(ab|ba)+( 12?)?"),
    "search": lambda: engine.search(r"b{2}"),
    "grammar": lambda: engine.grammar('start: "{" pair ("," " " pair)* "}"\npair: "\\"" KEY "\\"" ": " NUM\n'
                                      "KEY: /[ab]+/\nNUM: /[12]+/\n"),
    "json_schema": lambda: engine.json_schema({"type": "object", "properties": {"a": {"type": "integer"},
                                                                                 "b": {"enum": ["ab", "ba"]}},
                                               "required": ["a"], "additionalProperties": False}),
}
REFERENCE = {  # an independent check of complete texts
    "regex": lambda s: regex.fullmatch(r"(ab|ba)+( 12?)?", s) is not None,
    "search": lambda s: "bb" in s,
}


def reference_mask(lm, constraint, text):
    eos = next(iter(lm.vocab.eos_ids))
    out = []
    for i, s in enumerate(lm.vocab.strings):
        if i == eos:
            out.append(constraint.allows(text, complete=True))
        elif lm.vocab.special[i]:
            out.append(False)
        else:
            out.append(constraint.allows(text + s))
    return out


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_allowed_tokens_agree_with_decode_and_check_on_random_walks(lm, name):
    constraint = CONSTRAINTS[name]()
    rng = random.Random(0)
    for walk in range(4):
        ctx = LMContext(lm, "", canonical=False)
        for _ in range(8):
            mask = constraint.allowed_in(ctx).tolist()
            allowed = [i for i, ok in enumerate(mask) if ok]
            reference = reference_mask(lm, constraint, ctx.text)
            assert all(r or not m for m, r in zip(mask, reference)), (name, ctx.text)  # never more
            # Where the grammar forces text, llguidance allows only the tokens that write the most of it
            # ("{" is left out when '{"' is forced and is a token): never a canonical tokenization.
            left_out = [lm.vocab.strings[i] for i, (m, r) in enumerate(zip(mask, reference)) if r and not m]
            assert all(any(lm.vocab.strings[j].startswith(x) and lm.vocab.strings[j] != x for j in allowed)
                       for x in left_out), (name, ctx.text, left_out)
            eos = next(iter(lm.vocab.eos_ids))
            if name in REFERENCE:  # end-of-text exactly on complete text
                assert mask[eos] == REFERENCE[name](ctx.text)
            text_tokens = [i for i in allowed if i != eos]
            if not text_tokens:
                break
            ctx.extend([rng.choice(text_tokens)])


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_copies_move_independently(lm, name):
    constraint = CONSTRAINTS[name]()
    eos = next(iter(lm.vocab.eos_ids))
    ctx = LMContext(lm, "", canonical=False)
    rng = random.Random(1)
    for _ in range(2):
        ctx.extend([rng.choice([i for i, ok in enumerate(constraint.allowed_in(ctx).tolist()) if ok and i != eos])])
    before = constraint.allowed_in(ctx).tolist()
    copies = [copy.deepcopy(ctx) for _ in range(3)]
    options = [i for i, ok in enumerate(before) if ok and i != eos]
    for k, c in enumerate(copies):
        c.extend([options[k % len(options)]])
        fresh = LMContext(lm, "", canonical=False)
        fresh.extend(c.generated)
        assert constraint.allowed_in(c).tolist() == constraint.allowed_in(fresh).tolist()
    assert constraint.allowed_in(ctx).tolist() == before  # the original did not move
    assert constraint.state(ctx) is not constraint.state(copies[0])


def test_a_resampled_copy_shares_its_state_until_it_moves(lm):
    constraint = CONSTRAINTS["regex"]()
    ctx = LMContext(lm, "", canonical=False)
    constraint.allowed_in(ctx)
    twin = copy.deepcopy(ctx)
    shared = ctx.constraint_states[constraint.key]
    assert twin.constraint_states[constraint.key] is shared  # no copy until one of them moves
    twin.extend([lm.vocab.strings.index("ab")])
    constraint.allowed_in(twin)
    assert twin.constraint_states[constraint.key] is not shared


def test_a_particles_matcher_is_freed_with_it(lm):
    import gc
    import weakref

    constraint = CONSTRAINTS["json_schema"]()
    ctx = LMContext(lm, "", canonical=False)
    constraint.allowed_in(ctx)
    state = weakref.ref(constraint.state(ctx))
    del ctx
    gc.collect()
    assert state() is None


@pytest.mark.parametrize("name", ["grammar", "json_schema"])
def test_masks_kept_by_the_look_ahead_are_the_engines_own(lm, name):
    """The canonical look-ahead computes the mask after each candidate and keeps it for the next step:
    along random canonical walks, the kept mask equals a fresh matcher's after the same tokens."""
    import numpy as np

    constraint = CONSTRAINTS[name]()
    eos = next(iter(lm.vocab.eos_ids))
    rng = random.Random(2)
    reused = 0
    for _ in range(6):
        ctx = LMContext(lm, "")
        for _ in range(10):
            allowed = [i for i, ok in enumerate(constraint.allowed_in(ctx).tolist()) if ok and i != eos]
            if not allowed:
                break
            state = constraint.state(ctx)
            kept = state.ahead[1] if state.ahead is not None else {}
            token = rng.choice(allowed)
            ctx.extend([token])
            state = constraint.state(ctx)
            fresh = constraint.matcher(lm.vocab)
            assert fresh.consume_tokens(ctx.generated)
            expected = engine.packed(fresh, lm.vocab.size)
            if token in kept:
                reused += 1
                assert state.packed() is kept[token]
            assert np.array_equal(state.packed(), expected)
    assert reused > 0


def test_prefixes_among_agrees_with_pairwise_comparison():
    import numpy as np

    from steer.constraints.tokens import TokenTable

    lm = steer.tiny_model("abc ", merges=[("a", "b"), ("ab", "c"), ("b", "c"), (" ", "a"), (" a", "b")], seed=0)
    table, strings = TokenTable.of(lm.vocab, cache=False), lm.vocab.strings
    text = np.flatnonzero(table.text)
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.choice(text, size=rng.integers(0, len(text) + 1), replace=False)
        found = table.prefixes_among(ids).tolist()
        expected = {a for a in ids.tolist() if strings[a] and any(b != a and strings[b].startswith(strings[a])
                                                                  for b in ids.tolist())}
        assert set(found) == expected
        assert [len(strings[i]) for i in found] == sorted(len(strings[i]) for i in found)


@pytest.mark.parametrize("pattern, space_lives", [(r"x [AB]+", False), (r"x [AB1]+", True)])
def test_a_drawn_token_with_no_canonical_continuation_is_refused_among_many(monkeypatch, pattern, space_lives):
    """Where very many tokens are allowed the mask is not looked ahead of; a drawn token is checked:
    before `[AB]+` every continuation of a lone space merges with it (" A" is a token), a dead end;
    before a digit it is not."""
    monkeypatch.setattr(engine, "few_ids", lambda words, limit: None)  # every choice counts as very wide
    lm = steer.tiny_model("xAB1 ", merges=[(" ", "A"), (" ", "B")], seed=0)
    strings = lm.vocab.strings
    ctx = LMContext(lm, "")
    ctx.extend([strings.index("x")])
    constraint = engine.regex(pattern)
    assert constraint.allowed_in(ctx)[strings.index(" ")]  # the mask keeps it: no look-ahead here
    check = constraint.token_check(ctx)
    assert check(strings.index(" A")) and check(strings.index(" B"))
    assert check(strings.index(" ")) == space_lives


def test_copies_share_a_mask_in_use_and_no_state_keeps_one_after(lm):
    """Copies made by resampling get the mask already computed while it is in use; once nobody uses it
    the state holds no full mask (only the engine's packed one), so particles stay small."""
    import gc

    constraint = CONSTRAINTS["json_schema"]()
    ctx = LMContext(lm, "", canonical=False)
    mask = constraint.allowed_in(ctx)
    twin = copy.deepcopy(ctx)
    assert constraint.allowed_in(twin) is mask
    state = constraint.state(ctx)
    del mask
    gc.collect()
    assert state.result[1]() is None
    assert constraint.allowed_in(twin).tolist() == constraint.allowed_in(ctx).tolist()


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_the_packed_intersection_with_the_base_restriction_is_the_plain_one(lm, name):
    """Under canonical tokenization the mask is intersected with the base restriction while packed and
    marked as lying within it: it must equal the engine's own mask (with its end-of-text entry) and
    the base mask intersected as bools, along random walks."""
    from steer.constraints.maskops import both
    from steer.constraints.target import base_mask, restricted

    constraint = CONSTRAINTS[name]()
    rng = random.Random(1)
    eos = next(iter(lm.vocab.eos_ids))
    for walk in range(4):
        ctx = LMContext(lm, "", canonical=True)
        for _ in range(8):
            mask, base = constraint.allowed_in(ctx), base_mask(ctx)
            assert base is not None and mask.within is base
            state = constraint.state(ctx)
            engine_mask = engine.bitmask(state.matcher, lm.vocab.size)
            engine_mask[eos] = mask[eos].item()  # (end-of-text: judged by completeness, checked elsewhere)
            plain = both(torch.from_numpy(engine_mask), base)
            # the packed path never allows more, and drops only what the look-ahead drops (tokens with
            # no canonical continuation)
            assert not (mask & ~plain).any(), (name, ctx.text)
            assert restricted(mask, base) is mask and torch.equal(restricted(mask.clone(), base), mask)
            text_tokens = [i for i in mask.nonzero().flatten().tolist() if i != eos]
            if not text_tokens:
                break
            ctx.extend([rng.choice(text_tokens)])


def test_packed_mask_helpers_agree_with_bool_arrays():
    import numpy as np

    from steer.constraints.maskops import bits_at, cleared, few_ids, pack, unpack

    rng = np.random.default_rng(0)
    for size in (1, 31, 32, 33, 1000, 4099):
        for density in (0.0, 0.002, 0.3, 1.0):
            ok = rng.random(size) < density
            words = pack(ok)
            assert words.dtype == np.int32 and len(words) == -(-size // 32)
            assert np.array_equal(unpack(words, size), ok)
            ids = np.sort(rng.choice(size, min(size, 17), replace=False))
            assert np.array_equal(bits_at(words, ids), ok[ids])
            expect = ok.copy()
            expect[ids] = False
            assert np.array_equal(unpack(cleared(words, ids), size), expect)
            n = int(ok.sum())
            assert np.array_equal(few_ids(words, n), np.flatnonzero(ok))
            assert few_ids(words, n - 1) is None if n else few_ids(words, 0).size == 0


def test_particles_at_the_same_tokens_share_the_budget_checks_completion_searches(monkeypatch):
    """The completion search behind a budget check is remembered by the grammar and the tokens read: a
    copy at the same tokens (and a new constraint with the same grammar) gets every verdict a fresh
    search gives, without searching again."""
    from steer.constraints.target import Recent

    lm = steer.tiny_model(ALPHABET, merges=MERGES, seed=0)  # its own vocabulary: nothing remembered yet
    searches = []
    need = engine.Structured.need
    monkeypatch.setattr(engine.Structured, "need", lambda self, *a, **k: searches.append(1) or need(self, *a, **k))

    def verdicts(constraint, ctx):
        fits = constraint.token_check(ctx)
        return [bool(fits(t)) for t in range(lm.vocab.size)]

    ctx = LMContext(lm, "", heal=False, max_tokens=6)
    ctx.extend(lm.encode("ab", bos=False))
    first = verdicts(engine.regex(r"(ab|ba)+ 12"), ctx)
    assert searches and not all(first)  # some token leaves no room to end: the check does refuse
    searched = len(searches)
    twin = copy.deepcopy(ctx)
    assert verdicts(engine.regex(r"(ab|ba)+ 12"), twin) == first
    assert len(searches) == searched  # all remembered
    monkeypatch.setattr(engine, "recent", lambda vocab, name, limit: Recent(limit))  # nothing remembered
    assert verdicts(engine.regex(r"(ab|ba)+ 12"), twin) == first and len(searches) > searched
