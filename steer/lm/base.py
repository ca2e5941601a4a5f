"""The model side's interface: `LanguageModel` (requests in, log-probabilities out), `ModelState` (what
a backend reads and fills for one token sequence), `Token` and `Vocabulary`.  Backends (`hf`, `vllm`)
implement `LanguageModel.advance`; constraints only ever see a `Vocabulary`.  The context a program
samples from (`steer.context.LMContext`) builds on `ModelState`; nothing here knows of it."""

from __future__ import annotations

import itertools
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from ..scheduler import LogprobsRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


T = TypeVar("T")
_MISSING = object()
DRAWS = 8  # tokens pre-drawn per context in each batched round
_CONTROL = re.compile(r"image|audio|video|multimodal|^<unused\d+>$")


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """What constraints need to know about a tokenizer: each token's text and which ids are special."""

    strings: list[str]
    eos_ids: frozenset[int]
    bos_id: int | None
    special: np.ndarray  # bool per token: control tokens that never stand for text
    tokenizer: Any = field(default=None, repr=False)  # what canonical tokenization is judged by
    # What other layers compute from this vocabulary (token tables, canonical pairs, engine
    # tokenizers), kept here so that it is freed with the vocabulary: see `derived`.
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.strings)

    def derived(self, key: Any, build: Callable[[], T]) -> T:
        """What `build()` computes from this vocabulary, computed once per `key`.  Per-vocabulary caches
        live here rather than in module-level dictionaries keyed by the vocabulary, whose values would
        hold their own key (a weak key never freed) or outlive it (an id reused by a new vocabulary)."""
        found = self._derived.get(key, _MISSING)
        if found is _MISSING:
            found = self._derived[key] = build()
        return found

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, size: int | None = None) -> Vocabulary:
        size = max(size or 0, len(tokenizer))
        ids = list(range(len(tokenizer)))
        strings = tokenizer.batch_decode([[i] for i in ids]) + [""] * (size - len(tokenizer))
        special = np.zeros(size, dtype=bool)
        special[len(tokenizer):] = True
        for i, added in tokenizer.added_tokens_decoder.items():
            if added.special and i < size:
                special[i] = True
        special[tokenizer.all_special_ids] = True
        for i, added in tokenizer.added_tokens_decoder.items():  # markers of other modalities
            if i < size and _CONTROL.search(added.content):
                special[i] = True
        eos = tokenizer.eos_token_id
        eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        for i in eos_ids:
            strings[i] = ""
        return cls(strings, eos_ids, tokenizer.bos_token_id, special, tokenizer)


@dataclass(frozen=True)
class Token:
    """A sampled token: compares equal to its id or its text."""

    id: int
    text: str
    is_eos: bool = False

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Token):
            return self.id == other.id
        if isinstance(other, int):
            return self.id == other
        if isinstance(other, str):
            return (other == "eos" and self.is_eos) or (not self.is_eos and self.text == other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def __str__(self) -> str:
        return self.text

    def __int__(self) -> int:
        return self.id


class LanguageModel(ABC):
    """The interface the SMC core uses; another engine (vLLM, llama.cpp) plugs in by implementing it."""

    vocab: Vocabulary
    max_length: int
    name: str

    @abstractmethod
    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """Token ids of `text`, with the model's BOS token first when `bos`."""

    @abstractmethod
    def advance(self, requests: Sequence[LogprobsRequest]) -> None:
        """Serve one batched round: fill the `ModelState` fields of every request's context (see there)."""

    def serve(self, requests: Sequence[LogprobsRequest]) -> None:  # the scheduler's name for it
        self.advance(requests)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab.strings[i] for i in ids)

    def token(self, token_id: int) -> Token:
        return Token(token_id, self.vocab.strings[token_id], token_id in self.vocab.eos_ids)

    def release(self, context: ModelState) -> None:
        """Forget the cache state held for `context` (it will be re-encoded if used again)."""

    kv_bytes_per_token: int = 0  # keys and values one context keeps per token (0: the engine manages them)

    def particle_bytes(self, tokens: int) -> int:
        """Memory one particle of `tokens` tokens (prompt included) needs at most: its float32 next-token
        log-probabilities and their mask over the vocabulary, and its keys and values."""
        return self.vocab.size * 9 + self.kv_bytes_per_token * tokens

    def __deepcopy__(self, memo):  # particles are deep-copied; the model they use is shared
        return self


class TokenizerLanguageModel(LanguageModel):
    """A backend whose text goes through a transformers tokenizer (`self.tokenizer`), as both of ours do."""

    tokenizer: PreTrainedTokenizerBase

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if bos and self.vocab.bos_id is not None:
            ids = [self.vocab.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        eos = self.vocab.eos_ids
        return self.tokenizer.decode([i for i in ids if i not in eos], skip_special_tokens=False)


class ModelState:
    """The backend contract's data: one token sequence as a backend sees it.

    A backend reads `tokens` (the whole sequence, prompt included) and `serial` (unique per sequence:
    a copy made by resampling gets its own), and `LanguageModel.advance` fills, for every request:
    `logprobs` (float32 log-probabilities of the next token, shape [vocab]), `draw` (a few samples from
    them, or None), `pending_scores` (for a request with `score=k`: the log-probability of each of the
    last k tokens given those before it; None otherwise) and `backend_state` (anything the backend keeps per sequence, such
    as its cache row; cleared by `LanguageModel.release`).  Everything else a context holds is above
    the model side."""

    _serials = itertools.count()

    def __init__(self, lm: LanguageModel, tokens: list[int]):
        self.lm = lm
        self.tokens = tokens
        self.serial = next(self._serials)
        self.logprobs: torch.Tensor | None = None
        self.pending_scores: list[float] | None = None
        self.draw: list[int] | None = None
        self.backend_state: object = None

    async def next_logprobs(self) -> torch.Tensor:
        """Log-probabilities of the next token (waits for the batched round if out of date)."""
        if self.logprobs is None:
            await LogprobsRequest(self)
        return self.logprobs
