"""Probabilistic programs: particles that step, sample, observe and weigh themselves.

A `Program` is one particle.  Samplers deep-copy the program you give them into N particles and call
`step()` on each until it calls `finish()`; every SMC step is one call of `step()`.  Inside a step:

* `await self.sample(dist, proposal=q)` draws from q and adds log p(x) - log q(x) to the weight
  (nothing when q is omitted: x is drawn from p itself);
* `await self.observe(dist, value)` adds log p(value);
* `self.condition(ok)` kills the particle unless `ok` (a particle whose weight becomes zero, by any of
  these, stops its step at once); `self.score(logw)` multiplies the target by
  exp(logw);
* `self.twist(logw)` adds a heuristic that guides resampling but is taken back at the next step (and at
  the end), so it never changes the distribution targeted;
* `await self.call(sub)` runs a reusable `SubProgram` on this particle.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

from .distributions import Distribution
from .context import LMContext

NEG_INF = float("-inf")


class _Killed(Exception):
    """Ends the step of a particle whose weight just became zero: nothing after it can matter."""


class _Weighted:
    """The weight operations shared by programs and sub-programs (which forward them to their parent)."""

    def _particle(self) -> Program:
        raise NotImplementedError

    async def sample(self, dist: Distribution, proposal: Distribution | None = None) -> Any:
        """Draw from `proposal` (default: `dist` itself), correcting the weight by the density ratio."""
        if proposal is None:
            value, _ = await dist.sample()
            side = getattr(dist, "side_log_weight", 0.0)  # what the target conditions every token on
            if side:  # the reason is spelled out only if the particle dies (it decodes the text)
                self._particle()._add(side, lambda: getattr(dist, "zero_reason", "no next token is possible here"))
        else:
            value, log_q = await proposal.sample()
            log_p = await dist.log_prob(value)
            self._particle()._add(log_p - log_q, "a sample had zero probability under the target")
        dist.commit(value)
        return value

    async def observe(self, dist: Distribution, value: Any) -> float:
        """Condition on `dist` having produced `value`; returns log p(value)."""
        log_p = await dist.log_prob(value)
        self._particle()._add(log_p, lambda: getattr(dist, "zero_reason", None)
                              or f"observed value {value!r} has zero probability")
        dist.commit(value)
        return log_p

    def condition(self, ok: bool, reason: str = "condition failed") -> None:
        """Keep only executions where `ok` holds."""
        if not ok:
            self._particle()._add(NEG_INF, reason)

    def score(self, log_weight: float) -> None:
        """Multiply the target density by exp(log_weight)."""
        self._particle()._add(float(log_weight), "score of -inf")

    def twist(self, log_weight: float) -> None:
        """Add a temporary weight: it steers resampling now and is removed at the next step."""
        particle = self._particle()
        particle._twist += float(log_weight)
        particle._add(float(log_weight), "twist of -inf")

    async def call(self, sub: SubProgram) -> Any:
        """Run a sub-program on this particle and return its result."""
        sub.parent = self
        return await sub.run()


class Program(_Weighted):
    """One particle of a probabilistic program.  Subclass it and write `async def step(self)`."""

    def __init__(self) -> None:
        self.weight = 0.0  # log weight
        self.finished = False
        self.death_reason: str | None = None
        self._twist = 0.0

    async def step(self) -> None:
        raise NotImplementedError("a Program must define `async def step(self)`")

    def finish(self) -> None:
        """Stop stepping this particle: its current state is a complete sample."""
        self.finished = True

    def result(self) -> Any:
        """The value this particle stands for in the posterior (default: its text)."""
        return str(self)

    def __str__(self) -> str:
        contexts = list(self._lm_contexts())
        if len(contexts) == 1:
            return contexts[0].text
        return repr(self)

    # -- used by the samplers -------------------------------------------------------------------------
    def _particle(self) -> Program:
        return self

    def _add(self, log_weight: float, reason: str | Callable[[], str]) -> None:
        """Add to the log weight; `reason` (or what it returns) is kept if the particle dies."""
        if math.isnan(log_weight):
            raise ValueError("a weight update was NaN")
        self.weight += log_weight
        if self.weight == NEG_INF:
            self.death_reason = self.death_reason or (reason if isinstance(reason, str) else reason())
            self.finished = True
            raise _Killed

    def _untwist(self) -> None:
        if self._twist:
            self.weight -= self._twist
            self._twist = 0.0

    async def _advance(self) -> None:
        self._untwist()
        try:
            await self.step()
        except _Killed:
            pass
        if self.finished:
            self._untwist()

    def _lm_contexts(self) -> Iterator[LMContext]:
        """The LM contexts this particle holds (in attributes, lists, dicts and sub-programs)."""
        yield from _find_contexts(vars(self), set())

    def _release(self) -> None:
        """Give back the cache space of this particle's contexts (done when it finishes)."""
        for context in self._lm_contexts():
            context.lm.release(context)


def _find_contexts(value: Any, seen: set[int]) -> Iterator[LMContext]:
    """The LM contexts inside `value`, walked with a stack (a program's values may nest thousands deep)."""
    stack = [value]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, LMContext):
            yield value
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, (Program, SubProgram)):
            stack.append({k: v for k, v in vars(value).items() if k != "parent"})


class SubProgram(_Weighted):
    """A reusable piece of a program: define `async def run(self)`, invoke with `await self.call(sub)`.

    Its sample / observe / condition / score / twist act on the particle that calls it.
    """

    parent: _Weighted | None = None

    async def run(self) -> Any:
        raise NotImplementedError("a SubProgram must define `async def run(self)`")

    def _particle(self) -> Program:
        if self.parent is None:
            raise RuntimeError("a SubProgram must be run with `await program.call(sub)`")
        return self.parent._particle()


class FunctionProgram(Program):
    """A program whose step is a plain async function `step(p, **state)` (see `program`)."""

    def __init__(self, step: Callable, state: dict[str, Any]):
        super().__init__()
        self._step = step
        self.state = state

    async def step(self) -> None:
        await self._step(self, **self.state)

    def __repr__(self) -> str:
        return f"{self._step.__name__}({self.state!r})"


def program(step: Callable) -> Callable[..., FunctionProgram]:
    """Turn `async def step(p, **state)` into a program constructor: `step_fn(**state)` -> Program.

    `p` is the particle (with sample, observe, condition, finish, ...); the keyword arguments are its
    state, copied into every particle, so contexts and mutable values evolve per particle.

        @steer.program
        async def short_words(p, ctx, max_tokens=20):
            token = await p.sample(ctx.next_token(steer.masks.word_length(max=5)))
            if token.is_eos or ctx.written >= max_tokens:
                p.finish()

        posterior = steer.smc(short_words(ctx=steer.LMContext(lm, "Once")), particles=8)
    """

    @functools.wraps(step)
    def make(**state: Any) -> FunctionProgram:
        return FunctionProgram(step, state)

    return make


def clone(particle: Program) -> Program:
    """An independent copy of a particle; its LM contexts share the parent's cache until they diverge."""
    return copy.deepcopy(particle)
