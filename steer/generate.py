"""The stock program: sample a continuation of a prompt, optionally masked, up to a stop string."""

from __future__ import annotations

from typing import Any

from .errors import SteerError
from .lm import LanguageModel
from .program import Program
from .context import LMContext


class Generate(Program):
    """Continue `prompt` for at most `max_tokens` tokens, stopping at EOS or at the first `stop` string.

    `mask` (any mask spec, e.g. `steer.masks.word_length(max=5)`) restricts every token through a
    locally constrained proposal, which adds the log mass of the allowed tokens to the weight.

    `constraint` (a regex, JSON schema, grammar or check) conditions the text on it instead: each
    token is observed within it, and the text must end within `max_tokens` (a budget the proposals
    keep), so the posterior is the LM given "a complete text the constraint allows".
    """

    def __init__(self, lm: LanguageModel, prompt: str, max_tokens: int = 32, stop: str | None = None,
                 mask: Any = None, constraint: Any = None):
        super().__init__()
        if max_tokens < 1:
            raise SteerError(f"max_tokens must be at least 1, got {max_tokens}")
        # the stop string ends the text; with a constraint the budget is one the text must end within
        self.context = LMContext(lm, prompt, end=[stop] if stop else (),
                                  max_tokens=max_tokens if constraint is not None else None)
        if len(self.context.tokens) + max_tokens > lm.max_length:
            raise SteerError(
                f"prompt ({len(self.context.tokens)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"model's context of {lm.max_length} tokens"
            )
        self.max_tokens = max_tokens
        self.stop = stop or None
        self.mask = mask
        self.constraint = constraint

    async def step(self) -> None:
        ctx = self.context
        if self.constraint is not None:
            await self.observe(ctx.allowed(self.constraint), True)
        proposal = ctx.next_token(self.mask) if self.mask is not None else None
        token = await self.sample(ctx.next_token(), proposal=proposal)
        if token.is_eos or ctx.written >= self.max_tokens:
            self.finish()

    def result(self) -> str:
        return self.context.text
