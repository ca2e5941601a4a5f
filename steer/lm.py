"""Language-model backend: batched next-token log-probabilities over one shared KV cache.

`LanguageModel` is the small interface the SMC core relies on; `HFLanguageModel` implements it for any
transformers causal LM.  All contexts of a model live as rows of a single transformers cache.  Every
batched round (`advance`) lays the rows out afresh:

* a row is kept for every live context, keyed by (source row, tokens not yet encoded); contexts with the
  same key share one row, so N particles with the same prompt encode it once, and identical particles
  after resampling are computed once;
* rows are gathered with the cache's own `reorder_cache` (as beam search does), so resampled copies
  start from their parent's keys and values;
* new tokens are left-padded into one chunk, padding is masked out of attention and positions are
  counted per row, so each context costs the tokens it adds, never a re-encoding of its past;
* the LM head runs only on each row's last position (and on every position of rows being scored).
"""

from __future__ import annotations

import itertools
import re
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import SteerError
from .randomness import categorical
from .scheduler import LogprobsRequest

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


_DRAWS = 8  # tokens pre-drawn per context in each batched round
_CONTROL = re.compile(r"image|audio|video|multimodal|^<unused\d+>$")


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """What constraints need to know about a tokenizer: each token's text and which ids are special."""

    strings: list[str]
    eos_ids: frozenset[int]
    bos_id: int | None
    special: np.ndarray  # bool per token: control tokens that never stand for text
    tokenizer: Any = field(default=None, repr=False)  # what canonical tokenization is judged by

    @property
    def size(self) -> int:
        return len(self.strings)

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
        """Serve one batched round: set `context.logprobs` (float32, shape [vocab]) for every request,
        and `context.pending_scores` for those with `score=True`."""

    def serve(self, requests: Sequence[LogprobsRequest]) -> None:  # the scheduler's name for it
        self.advance(requests)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab.strings[i] for i in ids)

    def token(self, token_id: int) -> Token:
        return Token(token_id, self.vocab.strings[token_id], token_id in self.vocab.eos_ids)

    def context(self, prompt: str = "", *, bos: bool = True, heal: bool = True, canonical: bool = True,
                allow_special: bool = False, end: str | Sequence[str] = (),
                max_tokens: int | None = None) -> LMContext:
        """A context to sample from; see `LMContext` for the options."""
        return LMContext(self, prompt, bos=bos, heal=heal, canonical=canonical, allow_special=allow_special,
                         end=end, max_tokens=max_tokens)

    def release(self, context: LMContext) -> None:
        """Forget the cache state held for `context` (it will be re-encoded if used again)."""

    def __deepcopy__(self, memo):  # particles are deep-copied; the model they use is shared
        return self


class LMContext:
    """A token sequence under a language model: the state a particle extends token by token.

    Copies made by resampling share the model and, until they diverge, the cache row of their parent.
    """

    _serials = itertools.count()

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
        self.lm = lm
        if max_tokens is not None and max_tokens < 1:
            raise SteerError(f"max_tokens must be at least 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.end: tuple[str, ...] = (end,) if isinstance(end, str) else tuple(end)
        if not all(isinstance(e, str) and e for e in self.end):
            raise SteerError("end strings must be non-empty strings")
        self.end_at: int | None = None  # where the text stops once a token wrote an end string
        self.tokens: list[int] = lm.encode(prompt, bos=bos) if isinstance(prompt, str) else list(prompt)
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
        self.logprobs: torch.Tensor | None = None  # next-token log-probs after self.tokens
        self.pending_scores: list[float] | None = None
        self.draw: list[int] | None = None  # samples from `logprobs` drawn in the batched round, unused so far
        self.mask: torch.Tensor | None = None  # restriction on the next token set by `allowed`
        # its log-probability, known when it was observed True (the mask then holds the base restriction)
        self.mask_log_mass: float | None = None
        self.serial = next(self._serials)
        self.backend_state: object = None  # owned by the model backend

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
    def tokens_left(self) -> int | None:
        """Tokens this context may still generate, the ending one included (None: no budget)."""
        return None if self.max_tokens is None else self.max_tokens - len(self.generated)

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

    async def next_logprobs(self) -> torch.Tensor:
        """Log-probabilities of the next token (waits for the batched round if out of date)."""
        if self.logprobs is None:
            await LogprobsRequest(self)
        return self.logprobs

    async def extend_scored(self, token_ids: Sequence[int]) -> float:
        """Append tokens and return their total log-probability, in one batched round."""
        if not token_ids:
            return 0.0
        first = (await self.next_logprobs())[token_ids[0]].item()
        self.extend(token_ids)
        if len(token_ids) == 1:
            return first
        await LogprobsRequest(self, score=True)
        return first + sum(self.pending_scores)

    # -- distributions --------------------------------------------------------------------------------
    def next_token(self, mask: object = None, tilt: object = None):
        """The LM's next-token distribution here, optionally restricted to `mask` and renormalised, and
        tilted by `tilt` (a soft preference: sampled from p·exp(tilt), the weight gains its mass)."""
        from .distributions import NextToken

        return NextToken(self, mask, tilt)

    def allowed(self, mask: object):
        """A Bernoulli over "the next token is in `mask`"; observing True restricts the next token."""
        from .distributions import TokenInMask

        return TokenInMask(self, mask)

    def continuation(self):
        """The distribution of a string continuing this context; observe it to force and score text."""
        from .distributions import Continuation

        return Continuation(self)

    # -- copying --------------------------------------------------------------------------------------
    def __deepcopy__(self, memo):
        new = LMContext.__new__(LMContext)
        new.__dict__.update(self.__dict__)
        new.tokens = list(self.tokens)
        new.serial = next(self._serials)
        new.draw = None  # a pre-drawn sample is used by one context only
        memo[id(self)] = new
        return new


@dataclass
class _Slot:
    """Where a context lives in the shared cache: its row in layout `layout`, `cached` tokens encoded."""

    layout: int
    row: int
    cached: int


class HFLanguageModel(LanguageModel):
    """A transformers causal LM served through one batched, reorderable KV cache (see module docs)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str | None = None,
        vocab: Vocabulary | None = None,
    ):
        from transformers import DynamicCache

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "name_or_path", "") or type(model).__name__
        self.vocab = vocab or Vocabulary.from_tokenizer(tokenizer, model.config.vocab_size)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()
        self._softcap = getattr(model.config, "final_logit_softcapping", None)
        self._make_cache = lambda: DynamicCache(config=model.config)
        self._cache = None
        self._mask: torch.Tensor | None = None  # [rows, columns] which cache columns hold real tokens
        self._layout = 0
        self._resident: weakref.WeakValueDictionary[int, LMContext] = weakref.WeakValueDictionary()
        self.forward_calls = 0  # batched forward passes served, for tests and benchmarks

    def decode(self, ids: Sequence[int]) -> str:
        eos = self.vocab.eos_ids
        return self.tokenizer.decode([i for i in ids if i not in eos], skip_special_tokens=False)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if bos and self.vocab.bos_id is not None:
            ids = [self.vocab.bos_id, *ids]
        return ids

    def release(self, context: LMContext) -> None:
        context.backend_state = None
        self._resident.pop(context.serial, None)
        if not self._resident:  # nobody holds a row: free the keys and values now
            self.reset()

    def reset(self) -> None:
        """Drop the whole cache (every context will be re-encoded on its next use)."""
        self._cache = self._mask = None
        self._layout += 1
        self._resident.clear()

    def _slot(self, context: LMContext) -> _Slot | None:
        slot = context.backend_state
        return slot if isinstance(slot, _Slot) and slot.layout == self._layout else None

    @torch.inference_mode()
    def advance(self, requests: Sequence[LogprobsRequest]) -> None:
        requested = {r.context.serial: r for r in requests}
        live = [r.context for r in requests]
        live += [c for s, c in sorted(self._resident.items()) if s not in requested and self._slot(c)]

        # One row per distinct (source row, tokens to encode).
        keys: dict[tuple, int] = {}
        rows_of: list[int] = []
        sources: list[int | None] = []
        chunks: list[list[int]] = []
        cached_after: list[int] = []
        asked = [c.serial in requested for c in live]
        for context, is_asked in zip(live, asked):
            slot = self._slot(context)
            source, cached = (slot.row, slot.cached) if slot else (None, 0)
            # Contexts nobody asked about keep their row as it is; their new tokens wait for a request.
            new_tokens = context.tokens[cached:] if is_asked else []
            cached_after.append(cached + len(new_tokens))
            key = (source, tuple(new_tokens))
            if key not in keys:
                keys[key] = len(sources)
                sources.append(source)
                chunks.append(new_tokens)
            rows_of.append(keys[key])

        scored_rows = {row for row, c, a in zip(rows_of, live, asked) if a and requested[c.serial].score}
        hidden = self._forward(sources, chunks)  # [rows, chunk, hidden]
        self._layout += 1
        self.forward_calls += 1

        # Log-probs at each row's last position (only rows someone asked for), in float32.
        asked_rows = [row for row, a in zip(rows_of, asked) if a]
        wanted = sorted(set(asked_rows))
        position = {row: i for i, row in enumerate(wanted)}
        logprobs = self._logprobs(hidden[wanted, -1])
        multiplicity = np.bincount(asked_rows, minlength=len(sources))
        # A few draws per context: a masked next token takes the first that falls in its mask (exact
        # rejection sampling), which saves a full inverse-CDF pass over the vocabulary most of the time.
        draws = categorical(logprobs.exp(), int(multiplicity.max()) * _DRAWS).tolist()
        used = dict.fromkeys(wanted, 0)
        width = hidden.shape[1]
        row_scores = {}
        for row in scored_rows:
            n = len(chunks[row])
            lp = self._logprobs(hidden[row, width - n:width - 1])
            row_scores[row] = lp.gather(1, torch.tensor(chunks[row][1:])[:, None])[:, 0].tolist()

        for context, row, cached, is_asked in zip(live, rows_of, cached_after, asked):
            context.backend_state = _Slot(self._layout, row, cached)
            self._resident[context.serial] = context
            if is_asked:
                context.logprobs = logprobs[position[row]]
                context.draw = draws[position[row]][used[row] * _DRAWS:(used[row] + 1) * _DRAWS]
                used[row] += 1
                context.pending_scores = row_scores.get(row)

    def _forward(self, sources: list[int | None], chunks: list[list[int]]) -> torch.Tensor:
        """Lay out the cache rows `sources` (None: a fresh row), append `chunks`, return hidden states."""
        width = max(len(c) for c in chunks)
        n_rows = len(sources)
        index = torch.tensor([0 if s is None else s for s in sources])
        fresh = torch.tensor([s is None for s in sources])
        if self._cache is None or fresh.all():
            self._cache, past = self._make_cache(), torch.zeros(n_rows, 0, dtype=torch.long)
        else:
            if not torch.equal(index, torch.arange(self._mask.shape[0])):
                self._cache.reorder_cache(index)
            past = self._mask[index].masked_fill(fresh[:, None], 0)
        input_ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
        chunk_mask = torch.zeros(n_rows, width, dtype=torch.long)
        for i, chunk in enumerate(chunks):
            if chunk:
                input_ids[i, width - len(chunk):] = torch.tensor(chunk)
                chunk_mask[i, width - len(chunk):] = 1
        self._mask = torch.cat([past, chunk_mask], dim=1)
        # Each token's position counts only the real tokens before it in its own row.
        positions = (self._mask.cumsum(1) - 1).clamp(min=0)[:, -width:]
        out = self._decoder(
            input_ids=input_ids.to(self.device),
            attention_mask=self._mask.to(self.device),
            position_ids=positions.to(self.device),
            cache=self._cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._head(hidden).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return torch.log_softmax(logits, dim=-1).cpu()
