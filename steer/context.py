"""The context a program samples from: a token sequence under a language model, with what steering
needs on top of the model's own state (token healing, end strings, a token budget, the restriction
observed on the next token, per-constraint matcher states) and the distributions over what comes next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .distributions import Continuation, NextToken, TokenInMask
from .errors import SteerError
from .lm.base import LanguageModel, ModelState, Token
from .scheduler import LogprobsRequest


class LMContext(ModelState):
    """A token sequence under a language model: the state a particle extends token by token.

    Copies made by resampling share the model and, until they diverge, the cache row of their parent.
    """

    def __init__(self, lm: LanguageModel, prompt: str | Sequence[int] = "", *, bos: bool = True,
                 heal: bool = True, canonical: bool = True, allow_special: bool = False,
                 end: str | Sequence[str] = (), max_tokens: int | None = None):
        """`heal`: back off a prompt's last token when the prompt ends in white space or mid-word; the
        first generated token must then start with that token's text.  `canonical`: only token
        sequences the tokenizer itself would produce (the target is the LM conditioned on canonical
        tokenization).  `allow_special`: let `next_token()` propose control and multimodal tokens.
        `end`: strings that end the text like the end-of-text token (e.g. "\n"): the token that writes
        one is returned with `is_eos` set, the text stops before it, and constraints judge the text
        before it as a complete text.  `max_tokens`: the text must end (end-of-text or an end string)
        within this many generated tokens, the ending one included; constraints that can tell (the
        regular-expression automaton) then leave out tokens after which no ending fits in the budget."""
        if max_tokens is not None and max_tokens < 1:
            raise SteerError(f"max_tokens must be at least 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.end: tuple[str, ...] = (end,) if isinstance(end, str) else tuple(end)
        if not all(isinstance(e, str) and e for e in self.end):
            raise SteerError("end strings must be non-empty strings")
        self.end_at: int | None = None  # where the text stops once a token wrote an end string
        super().__init__(lm, lm.encode(prompt, bos=bos) if isinstance(prompt, str) else list(prompt))
        self.canonical = canonical
        self.allow_special = allow_special
        # Token healing: a prompt ending in white space or mid-word ends in a token the model would
        # rarely have produced there (" " before " (555)", "Fra" before "nce").  Its last token is backed
        # off and the first generated token must start with that text, so the natural token is reachable.
        self.healed = ""
        if heal and isinstance(prompt, str) and prompt and (prompt[-1].isspace() or prompt[-1].isalnum()):
            last = self.tokens[-1] if len(self.tokens) > 1 else None
            if last is not None and not lm.vocab.special[last] and lm.vocab.strings[last]:
                self.healed = lm.vocab.strings[last]
                self.tokens.pop()
        if not self.tokens:
            raise SteerError("an LM context needs at least one token (use bos=True for an empty prompt)")
        if len(self.tokens) >= lm.max_length:
            raise SteerError(
                f"prompt is {len(self.tokens)} tokens; the model's context holds {lm.max_length}"
            )
        self.prompt_length = len(self.tokens)
        self.mask: torch.Tensor | None = None  # restriction on the next token set by `allowed`
        # its log-probability, known when it was observed True (the mask then holds the base restriction)
        self.mask_log_mass: float | None = None
        # per-constraint state (a grammar matcher), keyed by the constraint.  A state's `owner` is the
        # serial of the context that may move it; copying a context clears it, so the original and the
        # copies share the state until one moves, which forks it first (copy-on-write)
        self.constraint_states: dict[object, Any] = {}

    # -- state ----------------------------------------------------------------------------------------
    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length:]

    def _decoded(self) -> str:
        """The generated tokens decoded (cached: tokens are only ever appended)."""
        cached = self.__dict__.get("_decoded_cache")
        if cached is None or cached[0] != len(self.tokens):
            cached = self._decoded_cache = (len(self.tokens), self.lm.decode(self.generated))
        return cached[1]

    @property
    def full_text(self) -> str:
        """Everything generated (prompt excluded, and so the text that token healing backed off),
        including an end string and what its token wrote after it."""
        full = self._decoded()
        return full[len(self.healed):] if self.healed else full

    @property
    def text(self) -> str:
        """The generated text: `full_text` up to the first end string, if one has been written."""
        full = self.full_text
        return full if self.end_at is None else full[: self.end_at]

    @property
    def rewrote_prompt(self) -> bool:
        """The first generated token only re-wrote the prompt text that healing backed off ("Hello"
        after the prompt "Hello"): it adds no text, and budgets do not count it."""
        return (bool(self.healed) and len(self.tokens) > self.prompt_length
                and self.lm.vocab.strings[self.tokens[self.prompt_length]] == self.healed)

    @property
    def written(self) -> int:
        """Generated tokens that wrote text (or ended it): all of them but a re-write of the prompt."""
        return len(self.generated) - self.rewrote_prompt

    @property
    def tokens_left(self) -> int | None:
        """Tokens this context may still generate, the ending one included, not counting a first token
        that only re-writes the healed prompt text (None: no budget)."""
        return None if self.max_tokens is None else self.max_tokens - self.written

    @property
    def ended(self) -> bool:
        """A token has written one of the `end` strings (only end-of-text may follow)."""
        return self.end_at is not None

    def end_position(self, text: str, new: str) -> int | None:
        """Where the text would stop if `new` followed `text`: the start of the first end string that
        `new` completes (None if it completes none)."""
        if not self.end or self.end_at is not None:
            return None
        keep = max(len(e) for e in self.end) - 1
        tail = text[len(text) - keep:] if keep else ""
        joined = tail + new
        found = [i for i in (joined.find(e) for e in self.end) if i >= 0]
        return len(text) - len(tail) + min(found) if found else None

    def token(self, token_id: int) -> Token:
        """The token `token_id` as it would be written here (`is_eos` also for a token ending the text)."""
        token = self.lm.token(token_id)
        if not token.is_eos and self.end:
            new = token.text
            if self.heal:
                new = new[len(self.heal):]
            if self.end_position(self.text, new) is not None:
                return Token(token.id, token.text, True)
        return token

    @property
    def heal(self) -> str:
        """The backed-off prompt text that the next token must start with ("" once it is written)."""
        return self.healed if len(self.tokens) == self.prompt_length else ""

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"LMContext({self.text!r})"

    def extend(self, token_ids: Sequence[int]) -> None:
        """Append tokens (their log-probabilities are not counted: use `observe` for that)."""
        if not token_ids:
            return
        if len(self.tokens) + len(token_ids) > self.lm.max_length:
            raise SteerError(f"context would exceed the model's {self.lm.max_length} tokens")
        before = self.text if self.end and self.end_at is None else ""
        self.tokens.extend(token_ids)
        if self.end and self.end_at is None:
            self.end_at = self.end_position(before, self.full_text[len(before):])
        self.logprobs = None
        self.draw = None
        self.mask = None
        self.mask_log_mass = None

    async def extend_scored(self, token_ids: Sequence[int]) -> float:
        """Append tokens and return their total log-probability, in one batched round."""
        if not token_ids:
            return 0.0
        first = (await self.next_logprobs())[token_ids[0]].item()
        self.extend(token_ids)
        if len(token_ids) == 1:
            return first
        await LogprobsRequest(self, score=len(token_ids) - 1)
        return first + sum(self.pending_scores)

    # -- distributions --------------------------------------------------------------------------------
    def next_token(self, mask: object = None, tilt: object = None):
        """The LM's next-token distribution here, optionally restricted to `mask` and renormalised, and
        tilted by `tilt` (a soft preference: sampled from p·exp(tilt), the weight gains its mass)."""
        return NextToken(self, mask, tilt)

    def allowed(self, mask: object):
        """A Bernoulli over "the next token is in `mask`"; observing True restricts the next token."""
        return TokenInMask(self, mask)

    def continuation(self):
        """The distribution of a string continuing this context; observe it to force and score text."""
        return Continuation(self)

    # -- copying --------------------------------------------------------------------------------------
    def __deepcopy__(self, memo):
        new = LMContext.__new__(LMContext)
        new.__dict__.update(self.__dict__)
        new.tokens = list(self.tokens)
        for state in self.constraint_states.values():
            state.owner = None
        new.constraint_states = dict(self.constraint_states)
        new.serial = next(ModelState._serials)
        new.draw = None  # a pre-drawn sample is used by one context only
        memo[id(self)] = new
        return new
