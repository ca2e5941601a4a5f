"""An embedder made from a causal LM, LLaRA-style (`train.llara` adapts the model for it).

A text is followed by an instruction and a few slot tokens; the mean of the slots' final hidden
states (after the last norm) is its embedding. Passages get the EBAE prompt ("summarise the passage
above"), queries the EBAR prompt ("predict the passage that follows"), so a query lands near the
passages that would follow it. The prompt format is stored beside the model as `llara.json`; a plain
causal LM directory gets the default format, which makes the un-adapted baseline.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from steer.files import atomic_write_text

from .embedders import RetrievalError, normalise

FORMAT_FILE = "llara.json"
SLOTS = 8


@dataclass
class LlaraFormat:
    """How texts become embedding prompts; saved beside an adapted model as `llara.json`."""

    ebae_instruction: str = "\nSummarise the passage above in a few words:"
    ebar_instruction: str = "\nPredict the passage that follows the one above:"
    ebae_slots: list[str] = field(default_factory=list)
    ebar_slots: list[str] = field(default_factory=list)
    max_tokens: int = 256  # of the passage; the instruction and slots always fit after it

    def save(self, directory: str | Path) -> None:
        atomic_write_text(Path(directory, FORMAT_FILE), json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> LlaraFormat:
        return cls(**json.loads(Path(directory, FORMAT_FILE).read_text()))


def slot_tokens(tokenizer, count: int = 2 * SLOTS) -> tuple[list[str], bool]:
    """`count` token strings for the slots: reserved `<unusedN>` tokens when the tokenizer has them,
    else new special tokens (second value True: the model's embeddings must be resized)."""
    vocab = tokenizer.get_vocab()
    reserved = sorted((t for t in vocab if re.fullmatch(r"<unused\d+>", t)), key=lambda t: int(t[7:-1]))
    if len(reserved) >= count:
        return reserved[:count], False
    new = [f"<llara_{i}>" for i in range(count)]
    tokenizer.add_special_tokens({"additional_special_tokens": new})
    return new, True


def default_format(tokenizer, max_tokens: int = 256) -> tuple[LlaraFormat, bool]:
    slots, added = slot_tokens(tokenizer)
    return LlaraFormat(ebae_slots=slots[:SLOTS], ebar_slots=slots[SLOTS:], max_tokens=max_tokens), added


def starts_with_bos(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts one before every text (so its models expect one), else None."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


def encode(tokenizer, texts: list[str], instruction: str, slots: list[str], max_tokens: int) -> list[list[int]]:
    """BOS (when the tokenizer uses one) + passage (cut to max_tokens) + instruction + slot tokens."""
    bos = starts_with_bos(tokenizer)
    bos = [] if bos is None else [bos]
    tail = tokenizer(instruction, add_special_tokens=False)["input_ids"] + tokenizer.convert_tokens_to_ids(slots)
    bodies = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    return [bos + body + tail for body in bodies]


def pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (slots then sit just before each row's padding)."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def slot_embeddings(model, ids: torch.Tensor, mask: torch.Tensor, slots: int = SLOTS) -> torch.Tensor:
    """Mean final hidden state (after the last norm) of the last `slots` tokens of each row."""
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    last = mask.sum(dim=1)  # index just past each row's final token
    positions = last[:, None] - torch.arange(slots, 0, -1, device=ids.device)[None, :]
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1])).mean(dim=1)


class LLMEmbedder:
    """Embeds with a (LLaRA-adapted) causal LM: EBAE prompt for passages, EBAR prompt for queries."""

    def __init__(self, model, tokenizer, fmt: LlaraFormat, name: str):
        self.model, self.tokenizer, self.fmt, self.name = model.eval(), tokenizer, fmt, name
        self.dim = int(model.config.get_text_config().hidden_size)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def load(cls, directory: str | Path) -> LLMEmbedder:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise RetrievalError(f"{directory}: not a model directory (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        if (directory / FORMAT_FILE).is_file():
            fmt = LlaraFormat.load(directory)
        else:
            fmt, added = default_format(tokenizer)
            if added:
                raise RetrievalError(f"{directory}: the tokenizer has no reserved tokens for embedding slots; "
                                     "adapt the model with `steer train llara` first")
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True,
                                                     use_safetensors=True)
        return cls(model, tokenizer, fmt, os.path.abspath(directory))

    def _embed(self, texts: Sequence[str], instruction: str, slots: list[str], batch_size: int,
               progress: bool) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        with torch.no_grad():
            for start in tqdm(range(0, len(texts), batch_size), desc="embedding", disable=not progress):
                rows = order[start:start + batch_size]
                ids, mask = pad(encode(self.tokenizer, [texts[i] for i in rows], instruction, slots,
                                       self.fmt.max_tokens), self.tokenizer.pad_token_id)
                out[rows] = slot_embeddings(self.model, ids, mask, len(slots)).float().numpy()
        return normalise(out)

    def embed_passages(self, texts: Sequence[str], batch_size: int = 16, progress: bool = False) -> np.ndarray:
        return self._embed(texts, self.fmt.ebae_instruction, self.fmt.ebae_slots, batch_size, progress)

    def embed_queries(self, texts: Sequence[str], batch_size: int = 16, progress: bool = False) -> np.ndarray:
        return self._embed(texts, self.fmt.ebar_instruction, self.fmt.ebar_slots, batch_size, progress)
