"""Batched sampling from a causal LM checkpoint, for trainers that generate their own data.

One `generate` call per group of prompts (left-padded), `n` samples per prompt, a seeded generator,
and a count of generated tokens so callers can report tokens per second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .common import load_causal_lm, load_tokenizer


@dataclass
class GenerationStats:
    tokens: int = 0
    seconds: float = 0.0
    calls: int = 0
    per_call: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Generator:
    """Samples continuations of templated prompts from one model directory."""

    def __init__(self, directory: str | Path, *, batch_size: int = 16, progress: bool = False):
        self.tokenizer = load_tokenizer(Path(directory))
        self.tokenizer.padding_side = "left"
        self.model = load_causal_lm(Path(directory)).eval()
        self.model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.progress = batch_size, progress
        self.stats = GenerationStats()

    def generate(self, prompts: list[str], *, n: int = 1, max_new_tokens: int = 128, temperature: float = 0.7,
                 top_p: float = 0.9, seed: int = 0, stop: str | None = None, desc: str = "generating") -> list[list[str]]:
        """`n` samples for each prompt (greedy when temperature is 0), cut at `stop` if given."""
        torch.manual_seed(seed)
        per_call = max(1, self.batch_size // n)
        out: list[list[str]] = []
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False)
        for start in tqdm(range(0, len(prompts), per_call), desc=desc, disable=not self.progress):
            group = prompts[start:start + per_call]
            batch = self.tokenizer(group, return_tensors="pt", padding=True)
            started = time.perf_counter()
            with torch.no_grad():
                ids = self.model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                          **sampling)
            self.stats.seconds += time.perf_counter() - started
            new = ids[:, batch["input_ids"].shape[1]:]
            counted = int((new != self.tokenizer.pad_token_id).sum())
            self.stats.tokens += counted
            self.stats.calls += 1
            self.stats.per_call.append(counted)
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            if stop:
                texts = [t.split(stop)[0] for t in texts]
            out.extend([t.strip() for t in texts[i * n:(i + 1) * n]] for i in range(len(group)))
        return out
