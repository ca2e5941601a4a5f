"""Sampling a whole word from an LM context, exactly.

A word is one token followed by as many tokens as continue it (letters with no leading space).  The
word is over when the *next* token does not continue it, which cannot be known before that token is
drawn.  So each time, the program samples the Bernoulli "the next token continues the word" from the
LM itself and, when it is False, leaves that fact on the context as a restriction (`ctx.mask`): the
token sampled next is drawn from the LM conditioned on not continuing the word.  The token sequence
is therefore an exact sample of the LM, cut into words; nothing is drawn twice or thrown away.
"""

from __future__ import annotations

from typing import Any

from .context import LMContext
from .constraints.masks import continues_word, open_word_length
from .program import SubProgram


class NextWord(SubProgram):
    """The next word of `context` (its text, with any leading space), optionally every token in `mask`.

    With a mask, each token is drawn from the LM restricted to the mask and the particle's weight
    gains the log-probability of the allowed set (a locally constrained proposal).
    """

    def __init__(self, context: LMContext, mask: Any = None, max_tokens: int = 16, tilt: Any = None):
        self.context = context
        self.mask = mask
        self.max_tokens = max_tokens
        self.tilt = tilt

    async def run(self) -> str:
        ctx = self.context
        start = len(ctx.tokens)
        for i in range(self.max_tokens):
            if i > 0:
                if not open_word_length(ctx.lm.decode(ctx.tokens[-1:])):
                    break  # the last token closed the word (space, punctuation, ...)
                if not await self.sample(ctx.allowed(continues_word())):
                    break
            if self.mask is not None:
                await self.observe(ctx.allowed(self.mask), True)
            token = await self.sample(ctx.next_token(tilt=self.tilt))
            if token.is_eos:
                break
        return ctx.lm.decode(ctx.tokens[start:])
