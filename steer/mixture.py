"""A mixture of contexts: p(y | x) = Σ_c p(c | x) p_LM(y | c, x), token by token.

Parallel retrieval-augmented inference (RA-DIT) puts each retrieved passage in its own context and
mixes the model's predictions with the retriever's probabilities. Mixing sequences exactly means the
weight of each context is updated by what was generated so far: at step t the next-token
distribution is Σ_c w_c(t) p(y_t | c, y_<t) with w_c(t) ∝ p(c | x) p(y_<t | c). The contexts are
advanced together, so all their forward passes share one batched round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .distributions import Distribution
from .errors import SteerError
from .lm import LanguageModel, Token
from .randomness import categorical
from .scheduler import AllOf, LogprobsRequest
from .context import LMContext


class MixtureContext:
    """Several prompts that generate the same continuation, mixed with prior weights `weights`."""

    def __init__(self, lm: LanguageModel, prompts: Sequence[str], weights: Sequence[float] | None = None):
        if not prompts:
            raise SteerError("a mixture needs at least one prompt")
        weights = np.full(len(prompts), 1.0 / len(prompts)) if weights is None else np.asarray(weights, float)
        if len(weights) != len(prompts) or (weights < 0).any() or weights.sum() <= 0:
            raise SteerError("a mixture needs one non-negative weight per prompt, not all zero")
        # No token healing: every context must see exactly the same generated tokens.
        self.contexts = [LMContext(lm, p, heal=False) for p in prompts]
        with np.errstate(divide="ignore"):
            self.log_weights = np.log(weights / weights.sum())

    @property
    def weights(self) -> np.ndarray:
        """Current posterior weights p(c | x, y_<t)."""
        w = np.exp(self.log_weights - self.log_weights.max())
        return w / w.sum()

    @property
    def text(self) -> str:
        return self.contexts[0].text

    @property
    def generated(self) -> list[int]:
        return self.contexts[0].generated

    def next_token(self) -> MixtureNextToken:
        return MixtureNextToken(self)

    async def _mixture(self) -> tuple[torch.Tensor, torch.Tensor]:
        stale = [c for c in self.contexts if c.logprobs is None]
        if stale:  # one batched round for all of them
            await AllOf(LogprobsRequest(c) for c in stale)
        rows = torch.stack([c.logprobs for c in self.contexts]).double()
        joint = rows + torch.as_tensor(self.log_weights, dtype=torch.float64)[:, None]
        return torch.logsumexp(joint, dim=0) - torch.logsumexp(torch.as_tensor(self.log_weights), dim=0), rows


class MixtureNextToken(Distribution):
    """The next token of a `MixtureContext`; committing it advances every context and re-weights them."""

    def __init__(self, mixture: MixtureContext):
        self.mixture = mixture
        self._rows: torch.Tensor | None = None

    async def sample(self) -> tuple[Token, float]:
        logprobs, self._rows = await self.mixture._mixture()
        token_id = int(categorical(torch.exp(logprobs).float()))
        return self.mixture.contexts[0].lm.token(token_id), logprobs[token_id].item()

    async def log_prob(self, value) -> float:
        logprobs, self._rows = await self.mixture._mixture()
        return logprobs[int(value)].item()

    def commit(self, value) -> None:
        token_id = int(value)
        if self._rows is not None:
            self.mixture.log_weights = self.mixture.log_weights + self._rows[:, token_id].numpy()
        for context in self.mixture.contexts:
            context.extend([token_id])
