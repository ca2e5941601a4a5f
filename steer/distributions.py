"""Distributions a program can `sample` from and `observe`.

Each distribution answers two async questions, `sample()` -> (value, log-prob) and `log_prob(value)`,
and may `commit(value)`: the side effect of choosing that value (the LM's next token extends its
context).  Program.sample/observe call `commit` only after the importance weight is computed, so a
proposal and a target can both look at the same context before it moves on.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import SteerError
from .lm import LMContext, Token
from .maskops import both, negate
from .randomness import categorical, streams

NEG_INF = float("-inf")
# A budget check gives up after this many rejected tokens (the particle then dies): a text that can
# still end has its ending tokens among the likely ones, and a full scan of 262k tokens takes seconds.
BUDGET_CHECKS = 2000


class Distribution(ABC):
    @abstractmethod
    async def sample(self) -> tuple[Any, float]:
        """Draw a value and return it with its log-probability."""

    @abstractmethod
    async def log_prob(self, value: Any) -> float:
        """Log-probability (or density) of `value`; -inf outside the support."""

    def commit(self, value: Any) -> None:
        """Apply the side effect of `value` having been chosen (default: none)."""


class Categorical(Distribution):
    """A finite distribution over arbitrary values, from probabilities or log-weights."""

    def __init__(self, values: Sequence[Any], probs: Sequence[float] | None = None,
                 logits: Sequence[float] | None = None):
        if (probs is None) == (logits is None):
            raise SteerError("Categorical needs exactly one of probs= or logits=")
        self.values = list(values)
        if probs is not None:
            with np.errstate(divide="ignore"):
                logits = np.log(np.asarray(probs, dtype=float))
        logits = np.asarray(logits, dtype=float)
        if len(logits) != len(self.values) or not len(self.values):
            raise SteerError("Categorical needs one weight per value, and at least one value")
        top = logits.max()
        if not np.isfinite(top):
            raise SteerError("Categorical has no value with positive probability")
        self.logp = logits - (top + np.log(np.exp(logits - top).sum()))

    async def sample(self) -> tuple[Any, float]:
        i = int(streams.numpy.choice(len(self.values), p=np.exp(self.logp)))
        return self.values[i], float(self.logp[i])

    async def log_prob(self, value: Any) -> float:
        total = [lp for v, lp in zip(self.values, self.logp) if v == value]
        return float(np.logaddexp.reduce(total)) if total else NEG_INF


class Bernoulli(Distribution):
    def __init__(self, p: float):
        if not 0.0 <= p <= 1.0:
            raise SteerError(f"Bernoulli probability must lie in [0, 1], got {p}")
        self.p = p

    async def sample(self) -> tuple[bool, float]:
        value = bool(streams.numpy.random() < self.p)
        return value, await self.log_prob(value)

    async def log_prob(self, value: Any) -> float:
        q = self.p if value else 1.0 - self.p
        return math.log(q) if q > 0 else NEG_INF


class Geometric(Distribution):
    """Number of failures before the first success, P(k) = (1-p)^k p, k = 0, 1, 2, ..."""

    def __init__(self, p: float):
        if not 0.0 < p <= 1.0:
            raise SteerError(f"Geometric probability must lie in (0, 1], got {p}")
        self.p = p

    async def sample(self) -> tuple[int, float]:
        value = int(streams.numpy.geometric(self.p)) - 1
        return value, await self.log_prob(value)

    async def log_prob(self, value: Any) -> float:
        if not isinstance(value, (int, np.integer)) or value < 0:
            return NEG_INF
        return value * math.log1p(-self.p) + math.log(self.p) if self.p < 1 else (0.0 if value == 0 else NEG_INF)


_probs_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _probs(logprobs: torch.Tensor) -> torch.Tensor:
    """exp(logprobs) in float64, computed once per next-token distribution (several masks use it)."""
    hit = _probs_cache.get(id(logprobs))
    if hit is not None and hit[0] is logprobs:
        return hit[1]
    if len(_probs_cache) > 512:
        _probs_cache.clear()
    probs = logprobs.double().exp()
    _probs_cache[id(logprobs)] = (logprobs, probs)
    return probs


def _log_mass(logprobs: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is None:
        return 0.0
    from .masks import excluded_ids

    excluded = excluded_ids(mask)  # known for the base masks, which leave out few tokens
    if excluded is not None:
        out = float(logprobs[excluded].double().exp().sum())
        if out < 0.5:  # 1 - out is then exact enough; otherwise sum what is kept
            return math.log1p(-out)
    probs = logprobs.exp()
    mass = float(torch.dot(probs, mask.to(probs.dtype)))  # a fused pass; float64 only when tiny
    if mass < 1e-30:
        mass = float((_probs(logprobs) * mask).sum())
    return math.log(mass) if mass > 0 else NEG_INF


class NextToken(Distribution):
    """The LM's next token in a context, optionally restricted to a mask and renormalised, and
    optionally tilted: with `tilt` φ the target gains the potential exp(φ(x)) and sampling draws from
    p(x)·exp(φ(x)) (see `steer.tilts`).

    Committing a token appends it to the context.  A restriction set by observing `ctx.allowed(mask)`
    applies too.
    """

    # log P(the next token meets what the target conditions on: healing, canonical tokenization, no
    # control tokens), added by Program.sample
    side_log_weight = 0.0

    def __init__(self, context: LMContext, mask: Any = None, tilt: Any = None):
        self.context = context
        self.mask_spec = mask
        self.tilt_spec = tilt

    def _tilt(self) -> torch.Tensor | None:
        from .constraints.tilts import resolve_tilt

        return resolve_tilt(self.tilt_spec, self.context)

    @property
    def zero_reason(self) -> str:
        return (f"no next token after {self.context.text[-40:]!r} is allowed and keeps the tokenization "
                f"canonical{_restriction_note(self.context)}")

    def _mask(self, base: Any = ...) -> torch.Tensor | None:
        """The restriction on the next token; `base`: the context's base mask, when known already."""
        from .masks import resolve

        ctx = self.context
        if self.mask_spec is None and ctx.mask is not None and ctx.mask_log_mass is not None:
            return ctx.mask  # observed as allowed just before: it holds the base restriction already
        mask = resolve(self.mask_spec, ctx)
        for extra in (ctx.mask, base_mask(ctx) if base is ... else base):
            if extra is not None:
                mask = extra if mask is None else both(mask, extra)
        return mask

    def _base_log_mass(self, logprobs: torch.Tensor) -> float:
        """The target observes the base restriction (see `steer.masks.base_mask`): its log mass, given
        the prompt's text.  While healing is pending that is relative to the tokens that reproduce the
        backed-off text, so the weight (and log_ml) is about the continuation of the prompt, not the
        probability of the prompt's own last token."""
        return self._side_from(logprobs, _log_mass(logprobs, base_mask(self.context)))

    def _side_from(self, logprobs: torch.Tensor, base_log_mass: float) -> float:
        """The side weight given the base mask's log mass (computed once per sample)."""
        from .masks import healing_mask

        heal = healing_mask(self.context)
        if heal is None or base_log_mass == NEG_INF:
            return base_log_mass
        return base_log_mass - _log_mass(logprobs, heal)

    async def sample(self) -> tuple[Token, float]:
        ctx = self.context
        logprobs = await ctx.next_logprobs()
        base = base_mask(ctx)
        mask = self._mask(base)
        base_log_mass = _log_mass(logprobs, base)
        self.side_log_weight = self._side_from(logprobs, base_log_mass)
        if mask is ctx.mask and ctx.mask_log_mass is not None:  # observed just before: mass known
            log_z = ctx.mask_log_mass
        else:  # with no constraint the mask is the base mask itself, whose mass is known
            log_z = base_log_mass if mask is base else _log_mass(logprobs, mask)
        if log_z == NEG_INF:
            raise SteerError(f"no token is allowed here{_restriction_note(ctx)} "
                             "(use observe/condition to reject instead of sample)")
        tilt = self._tilt()
        if tilt is not None:  # propose from p·exp(φ) within the mask; the weight gains E_p[exp φ]
            scores = logprobs.double() + tilt
            if mask is not None:
                scores = scores.masked_fill(negate(mask), NEG_INF)
            log_zt = torch.logsumexp(scores, 0).item()
            self.side_log_weight += log_zt - log_z
            ctx.draw = None
            token_id = int(categorical((scores - log_zt).exp()))
            return ctx.token(token_id), scores[token_id].item() - log_zt
        draws, ctx.draw = ctx.draw or [], None
        # The batched round's draws are samples of the unrestricted LM; the first inside the mask is an
        # exact sample of the restricted one (rejection sampling with a few tries).
        token_id = next((d for d in draws if mask is None or mask[d]), None)
        if token_id is None:
            probs = _probs(logprobs)
            token_id = int(categorical(probs if mask is None else probs * mask))
        return ctx.token(token_id), logprobs[token_id].item() - log_z

    async def log_prob(self, value: Any) -> float:
        token_id = int(value)
        logprobs = await self.context.next_logprobs()
        mask = self._mask()
        if mask is not None and not mask[token_id]:
            return NEG_INF
        tilt = self._tilt()
        bonus = tilt[token_id].item() if tilt is not None else 0.0  # the tilt is a potential of the target
        return logprobs[token_id].item() + bonus - _log_mass(logprobs, mask) + self._base_log_mass(logprobs)

    def commit(self, value: Any) -> None:
        self.context.extend([int(value)])


def base_mask(context: LMContext) -> torch.Tensor | None:
    from .masks import base_mask as base

    return base(context)


def budget_check(spec: Any, context: LMContext):
    from .masks import budget_check as check

    return check(spec, context)


def _draw_within(logprobs: torch.Tensor, allowed: torch.Tensor, check, draws: list[int] | None
                 ) -> tuple[int | None, float]:
    """A next token drawn from the LM within `allowed` that `check` accepts (adaptive weighted
    rejection sampling), and the log of an unbiased estimate of P(accepted | allowed).  (The estimate
    needs AWRS's second run even when the first draw passes: usually one more check.)"""
    from .checks import awrs
    from .masks import NOTHING_FITS

    if check is NOTHING_FITS:
        return None, NEG_INF
    first = next((d for d in draws or [] if allowed[d]), None)
    token, log_w, _ = awrs(logprobs, allowed, check, first=first, max_checks=BUDGET_CHECKS)
    return token, log_w


def _restriction_note(context: LMContext) -> str:
    """What else restricted the next token, for error messages: healing and a token budget."""
    notes = []
    if context.heal:
        notes.append(f"token healing: the next token must start with {context.heal!r}")
    left = getattr(context, "tokens_left", None)
    if left is not None:
        notes.append(f"the text must end within {left} more token{'s' if left != 1 else ''} (max_tokens)")
    return f" ({'; '.join(notes)})" if notes else ""


def _given(context: LMContext) -> torch.Tensor | None:
    """What is already known about the next token: a committed restriction and the base restriction."""
    base = base_mask(context)
    if base is None:
        return context.mask
    return base if context.mask is None else both(context.mask, base)


class TokenInMask(Distribution):
    """Bernoulli: is the next token in the mask?  Committing True restricts the next token to it.

    If the next token is already restricted (an earlier `allowed` was committed), the probability is
    conditional on that restriction, so successive observations multiply up to the joint probability.
    """

    def __init__(self, context: LMContext, mask: Any):
        self.context = context
        self.mask_spec = mask

    @property
    def zero_reason(self) -> str:
        spec = self.mask_spec if not isinstance(self.mask_spec, torch.Tensor) else "the mask"
        return f"no next token satisfies {spec!r} after {self.context.text[-40:]!r}{_restriction_note(self.context)}"

    async def _log_mass(self, observed: bool = False) -> float:
        """log P(next token in the mask | what is known); `observed`: it is being observed True, so a
        budget check may also fix the next token (see `_within_budget`)."""
        from .checks import TokenCheck
        from .masks import resolve

        if isinstance(self.mask_spec, TokenCheck):
            return await self._checked(self.mask_spec)
        self._resolved = resolve(self.mask_spec, self.context)
        logprobs = await self.context.next_logprobs()
        given = _given(self.context)
        log_given = 0.0
        if given is None:
            self._allowed = self._resolved
        else:
            log_given = _log_mass(logprobs, given)
            if log_given == NEG_INF:
                return NEG_INF
            self._allowed = both(self._resolved, given)
        self._new_log_mass = _log_mass(logprobs, self._allowed)
        log_in = self._new_log_mass - log_given
        if observed and log_in > NEG_INF:
            log_in += self._within_budget(logprobs)
        return log_in

    def _within_budget(self, logprobs: torch.Tensor) -> float:
        """Where the constraint checks drawn tokens against the budget: draw the next token within the
        mask by adaptive rejection, fix it, and return the log of the estimated share of the mask's
        mass that passes (0 with no check)."""
        ctx = self.context
        check = budget_check(self.mask_spec, ctx)
        if check is None:
            return 0.0
        token, log_w = _draw_within(logprobs, self._allowed, check, ctx.draw)
        self._allowed = torch.zeros(ctx.lm.vocab.size, dtype=torch.bool)
        ctx.draw = None if token is None else [token]  # the next-token sample takes it (its mask is just it)
        if token is None:
            self._new_log_mass = NEG_INF
            return NEG_INF
        self._allowed[token] = True
        self._new_log_mass = logprobs[token].item()
        return log_w

    async def _checked(self, check) -> float:
        """AWRS: an exact sample of the next token within the constraint, and an unbiased estimate of
        the constraint's probability; observing True then fixes the next token to that sample."""
        from .checks import awrs
        from .masks import NOTHING_FITS

        ctx = self.context
        vocab = ctx.lm.vocab
        text, pending = ctx.text, ctx.heal

        def accepts(i: int) -> bool:
            if i in vocab.eos_ids:
                return check.allows(text, complete=True)
            s = vocab.strings[i]
            if pending:  # healing: only the part after the backed-off prompt text is new text
                s = s[len(pending):] if s.startswith(pending) else ""
            at = ctx.end_position(text, s)
            if at is not None:  # writes an end string: the text before it must be a complete text
                return check.allows((text + s)[:at], complete=True)
            return not vocab.special[i] and check.allows(text + s)

        logprobs = await ctx.next_logprobs()
        given = _given(ctx)
        shift = 0.0
        approximation = getattr(check, "approximation", None)
        if approximation is not None:  # candidates come only from a regular over-approximation's mask
            # and, with a budget, only those after which the approximation can still end in time (a
            # necessary condition: it allows every text the check does)
            fits = approximation.budget_check(ctx)
            if fits is not None:
                exact = accepts
                accepts = lambda i: fits(i) and exact(i)
            if fits is NOTHING_FITS:
                shift = NEG_INF
            else:
                wide = approximation.allowed_in(ctx)
                narrowed = wide if given is None else both(given, wide)
                # P(A | given) = P(A | given & wide) * P(wide | given), since A lies within `wide`
                shift = _log_mass(logprobs, narrowed) - _log_mass(logprobs, given)
            if shift == NEG_INF:
                self._resolved = torch.zeros(vocab.size, dtype=torch.bool)
                self._allowed, self._new_log_mass, ctx.draw = self._resolved, NEG_INF, None
                return NEG_INF
            given = narrowed
        token, log_w, _ = awrs(logprobs, given, accepts, first=ctx.draw[0] if ctx.draw else None)
        log_w += shift
        # The accepted token is an exact sample of the LM within the constraint: keep it as the draw
        # that the next-token sample takes (its restriction is that single token).
        ctx.draw = None if token is None else [token]
        self._resolved = torch.zeros(vocab.size, dtype=torch.bool)
        self._new_log_mass = NEG_INF
        if token is not None:
            self._resolved[token] = True
            self._new_log_mass = logprobs[token].item()
        self._allowed = self._resolved  # the accepted token is within what was given
        return log_w

    async def sample(self) -> tuple[bool, float]:
        from .checks import TokenCheck

        if isinstance(self.mask_spec, TokenCheck):
            raise SteerError("a checked constraint (grammar, partial_regex) can only be observed True")
        log_in = await self._log_mass()
        value = bool(streams.numpy.random() < math.exp(log_in))
        return value, await self.log_prob(value)

    async def log_prob(self, value: Any) -> float:
        from .checks import TokenCheck

        if isinstance(self.mask_spec, TokenCheck) and not value:
            raise SteerError("a checked constraint (grammar, partial_regex) can only be observed True")
        log_in = await self._log_mass(observed=bool(value))
        if value:
            return log_in
        return math.log1p(-math.exp(log_in)) if log_in < 0 else NEG_INF

    def commit(self, value: Any) -> None:
        ctx = self.context
        if value:
            # Everything now known about the next token (with the base restriction), and its mass:
            # what NextToken samples from and renormalises by.
            ctx.mask, ctx.mask_log_mass = self._allowed, self._new_log_mass
        else:
            ctx.mask = negate(self._resolved) if ctx.mask is None else both(ctx.mask, negate(self._resolved))
            ctx.mask_log_mass = None


class Continuation(Distribution):
    """The text that continues a context.  Observing a string appends it and adds its log-probability,
    scored in one batched forward pass whatever its length."""

    def __init__(self, context: LMContext):
        self.context = context

    async def sample(self) -> tuple[str, float]:
        raise SteerError("a continuation can only be observed; sample tokens with next_token()")

    async def log_prob(self, value: Any) -> float:
        if isinstance(value, str):
            # With token healing pending, the backed-off prompt text and the value are tokenized together.
            value = self.context.lm.encode(self.context.heal + value, bos=False)
        return await self.context.extend_scored(list(value))
