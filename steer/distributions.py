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
from typing import Any, Protocol

import numpy as np
import torch

from .constraints.checks import awrs
from .constraints.target import base_mask, excluded_ids, healing_mask, restricted
from .constraints.maskops import both, negate
from .constraints.base import NOTHING_FITS, Context, as_constraint
from .constraints.tilts import as_tilt
from .errors import SteerError
from .lm.base import Token
from .randomness import categorical, streams


class SamplingContext(Context, Protocol):
    """What the distributions use of a context, beyond what constraints read (`steer.context.LMContext`
    provides it; the context module builds its distributions from this one, so this one names none)."""

    mask: torch.Tensor | None
    mask_log_mass: float | None
    draw: list[int] | None
    max_tokens: int | None

    async def next_logprobs(self) -> torch.Tensor: ...
    async def extend_scored(self, token_ids: Sequence[int]) -> float: ...
    def extend(self, token_ids: Sequence[int]) -> None: ...
    def token(self, token_id: int) -> Token: ...

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

    def __init__(self, context: SamplingContext, mask: Any = None, tilt: Any = None):
        """`mask`: a constraint whose allowed tokens restrict the draw (an exact one: a checked
        constraint is observed with `ctx.allowed(check)` first); `tilt`: a constraint (or a tensor of
        log-weights) whose tilt the draw follows."""
        self.context = context
        self.constraint = as_constraint(mask)
        if self.constraint is not None and not self.constraint.exact:
            raise SteerError(f"{self.constraint!r} is checked token by token, not a mask: observe "
                             "`ctx.allowed(check)` as True, then sample `ctx.next_token()`")
        self.tilting = as_tilt(tilt)

    def _tilt(self) -> torch.Tensor | None:
        return None if self.tilting is None else self.tilting.tilt(self.context)

    @property
    def zero_reason(self) -> str:
        return (f"no next token after {self.context.text[-40:]!r} is allowed and keeps the tokenization "
                f"canonical{_restriction_note(self.context)}")

    def _mask(self, base: Any = ...) -> torch.Tensor | None:
        """The restriction on the next token; `base`: the context's base mask, when known already."""
        ctx = self.context
        if self.constraint is None and ctx.mask is not None and ctx.mask_log_mass is not None:
            return ctx.mask  # observed as allowed just before: it holds the base restriction already
        mask = None if self.constraint is None else self.constraint.allowed_in(ctx)
        if ctx.mask is not None:
            mask = ctx.mask if mask is None else both(mask, ctx.mask)
        return restricted(mask, base_mask(ctx) if base is ... else base)

    def _base_log_mass(self, logprobs: torch.Tensor) -> float:
        """The target observes the base restriction (see `steer.constraints.target.base_mask`): its log mass, given
        the prompt's text.  While healing is pending that is relative to the tokens that reproduce the
        backed-off text, so the weight (and log_ml) is about the continuation of the prompt, not the
        probability of the prompt's own last token."""
        return self._side_from(logprobs, _log_mass(logprobs, base_mask(self.context)))

    def _side_from(self, logprobs: torch.Tensor, base_log_mass: float) -> float:
        """The side weight given the base mask's log mass (computed once per sample)."""
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


def _restriction_note(context: SamplingContext) -> str:
    """What else restricted the next token, for error messages: healing and a token budget."""
    notes = []
    if context.heal:
        notes.append(f"token healing: the next token must start with {context.heal!r}")
    left = getattr(context, "tokens_left", None)
    if left is not None:
        notes.append(f"the text must end within {left} more token{'s' if left != 1 else ''} (max_tokens)")
    return f" ({'; '.join(notes)})" if notes else ""


def _given(context: SamplingContext) -> torch.Tensor | None:
    """What is already known about the next token: a committed restriction and the base restriction."""
    base = base_mask(context)
    if base is None:
        return context.mask
    return base if context.mask is None else both(context.mask, base)


class TokenInMask(Distribution):
    """Bernoulli: is the next token allowed by the constraint?  Committing True restricts the next
    token to it.

    If the next token is already restricted (an earlier `allowed` was committed), the probability is
    conditional on that restriction, so successive observations multiply up to the joint probability.
    A constraint with a token check (a non-regular pattern, a grammar, a budget) is observed True by
    adaptive weighted rejection sampling within its mask: the weight gains an unbiased estimate of the
    probability, and the accepted token, an exact sample, becomes the next token.
    """

    def __init__(self, context: SamplingContext, mask: Any):
        self.context = context
        self.constraint = as_constraint(mask)
        if self.constraint is None:
            raise SteerError("allowed() needs a constraint")

    @property
    def zero_reason(self) -> str:
        ctx, c = self.context, self.constraint
        left = getattr(ctx, "tokens_left", None)
        if left is not None and left <= 2:  # the budget, not the constraint alone, leaves nothing
            return (f"the token budget ran out: the text must end within {left} more "
                    f"token{'s' if left != 1 else ''} (max_tokens={ctx.max_tokens}), and {c!r} allows no "
                    f"ending after {ctx.text[-40:]!r} (a mask with allow_eos=False never lets the text end; "
                    "raise max_tokens or let the constraint end)")
        return f"no next token satisfies {c!r} after {ctx.text[-40:]!r}{_restriction_note(ctx)}"

    async def _log_mass(self, observed: bool = False) -> float:
        """log P(next token allowed | what is known); `observed`: it is being observed True, so a token
        check applies too (and fixes the next token)."""
        ctx, c = self.context, self.constraint
        if not (observed or c.exact):
            raise SteerError(f"{c!r} is checked token by token: it can only be observed True")
        check = c.token_check(ctx) if observed else None
        logprobs = await ctx.next_logprobs()
        self._resolved = None if check is NOTHING_FITS else c.allowed_in(ctx)
        given = _given(ctx)
        log_given = 0.0 if given is None else _log_mass(logprobs, given)
        if check is NOTHING_FITS or log_given == NEG_INF:
            return self._dead()
        self._allowed = restricted(self._resolved, given)
        self._new_log_mass = _log_mass(logprobs, self._allowed)
        log_in = self._new_log_mass - log_given
        if check is None or log_in == NEG_INF:
            return log_in
        # Budget checks give up after BUDGET_CHECKS rejections (a text that can still end has its
        # ending tokens among the likely ones); a constraint's own exact check runs to the end.
        first = next((d for d in ctx.draw or [] if self._allowed is None or self._allowed[d]), None)
        token, log_w, _ = awrs(logprobs, self._allowed, check, first=first,
                               max_checks=BUDGET_CHECKS if c.exact else None)
        if token is None:
            return self._dead()
        self._allowed = torch.zeros(ctx.lm.vocab.size, dtype=torch.bool)
        self._allowed[token] = True
        self._new_log_mass = logprobs[token].item()
        ctx.draw = [token]  # the next-token sample takes it (its restriction is just this token)
        return log_in + log_w

    def _dead(self) -> float:
        """No allowed token: the restriction is empty."""
        self._allowed = torch.zeros(self.context.lm.vocab.size, dtype=torch.bool)
        self._new_log_mass, self.context.draw = NEG_INF, None
        return NEG_INF

    async def sample(self) -> tuple[bool, float]:
        log_in = await self._log_mass()
        value = bool(streams.numpy.random() < math.exp(log_in))
        return value, await self.log_prob(value)

    async def log_prob(self, value: Any) -> float:
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
        elif self._resolved is not None:
            ctx.mask = negate(self._resolved) if ctx.mask is None else both(ctx.mask, negate(self._resolved))
            ctx.mask_log_mass = None


class Continuation(Distribution):
    """The text that continues a context.  Observing a string appends it and adds its log-probability,
    scored in one batched forward pass whatever its length."""

    def __init__(self, context: SamplingContext):
        self.context = context

    async def sample(self) -> tuple[str, float]:
        raise SteerError("a continuation can only be observed; sample tokens with next_token()")

    async def log_prob(self, value: Any) -> float:
        if isinstance(value, str):
            # With token healing pending, the backed-off prompt text and the value are tokenized together.
            value = self.context.lm.encode(self.context.heal + value, bos=False)
        return await self.context.extend_scored(list(value))
