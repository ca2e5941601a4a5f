"""The transformers backend: batched next-token log-probabilities over one shared KV cache.

`HFLanguageModel` implements `LanguageModel` for any transformers causal LM.  All contexts of a model
live as rows of a single transformers cache.  Every batched round (`advance`) lays the rows out afresh:

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

import inspect
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ModelLoadError
from ..randomness import categorical
from ..scheduler import LogprobsRequest
from .base import DRAWS, ModelState, TokenizerLanguageModel, Vocabulary

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def cache_argument(forward: Callable) -> str:
    """The name under which `forward` takes a KV cache: transformers 5.20 renamed `past_key_values` to
    `cache` (vLLM's pins need the older)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


@dataclass
class _Slot:
    """Where a context lives in the shared cache: its row in layout `layout`, `cached` tokens encoded."""

    layout: int
    row: int
    cached: int


class HFLanguageModel(TokenizerLanguageModel):
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
        self._cache_argument = cache_argument(self._decoder.forward)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.kv_bytes_per_token = 2 * config.num_hidden_layers * heads * head_dim * model.dtype.itemsize
        self._cache = None
        self._mask: torch.Tensor | None = None  # [rows, columns] which cache columns hold real tokens
        self._layout = 0
        self._resident: weakref.WeakValueDictionary[int, ModelState] = weakref.WeakValueDictionary()
        self.forward_calls = 0  # batched forward passes served, for tests and benchmarks

    def release(self, context: ModelState) -> None:
        context.backend_state = None
        self._resident.pop(context.serial, None)
        if not self._resident:  # nobody holds a row: free the keys and values now
            self.reset()

    def reset(self) -> None:
        """Drop the whole cache (every context will be re-encoded on its next use)."""
        self._cache = self._mask = None
        self._layout += 1
        self._resident.clear()

    def _slot(self, context: ModelState) -> _Slot | None:
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
        # (a row re-encoded from scratch holds more new tokens than the request scores: its last ones count)
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
        draws = categorical(logprobs.exp(), int(multiplicity.max()) * DRAWS).tolist()
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
                context.draw = draws[position[row]][used[row] * DRAWS:(used[row] + 1) * DRAWS]
                used[row] += 1
                k = requested[context.serial].score
                context.pending_scores = row_scores[row][len(row_scores[row]) - k:] if k else None

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
            **{self._cache_argument: self._cache},
            use_cache=True,
        )
        return out.last_hidden_state

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._head(hidden).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return torch.log_softmax(logits, dim=-1).cpu()


def require_hf_directory(directory: Path) -> None:
    """A Hugging Face model directory (what the hf and vllm backends read), or a `ModelLoadError`."""
    if not directory.is_dir():
        raise ModelLoadError(f"model directory not found: {directory}")
    if not (directory / "config.json").exists():
        raise ModelLoadError(f"not a Hugging Face model directory (no config.json): {directory}")


def load(directory: Path, *, name: str, device: str | None = None, dtype: torch.dtype | None = None,
         **options) -> HFLanguageModel:
    """The hf backend: a transformers causal LM from a local directory (safetensors weights only)."""
    if options:
        raise ModelLoadError(f"the hf backend takes no engine options (got {', '.join(options)}); "
                             "they are for the vllm backend")
    require_hf_directory(directory)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading takes seconds; its per-tensor bar is noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32, local_files_only=True,
                                                     use_safetensors=True)
    except Exception as e:  # OSError, ValueError, safetensors' own error on a damaged file
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"cannot load a causal LM from {directory}: {reason}") from e
    return HFLanguageModel(place(model, device), tokenizer, name=name)


def default_device() -> str:
    """`$STEER_DEVICE` if set, else "cuda" when a GPU is visible, else "cpu": a script written on a laptop
    runs on the GPU server unchanged, and the variable pins the choice where it must not move."""
    return os.environ.get("STEER_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def place(model: torch.nn.Module, device: str | None) -> torch.nn.Module:
    """`model` moved to `device` (None: `default_device()`); a device that does not exist, or that
    torch was built without, is a `ModelLoadError` naming it."""
    device = device or default_device()
    try:
        return model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise ModelLoadError(f"cannot place the model on {device!r}: {str(e).splitlines()[0]}") from e
