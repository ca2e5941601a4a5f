"""Batched sampling from a causal LM checkpoint, for trainers that generate their own data.

One `generate` call per group of prompts of similar length (left-padded), `n` samples per prompt from
one read of it, a seeded generator, and a count of generated tokens so callers can report tokens per
second.
"""

from __future__ import annotations

import inspect
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from steer.errors import SteerError
from steer.jsonl import write_jsonl
from steer.lm.hf import cache_argument

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
        # how this model's forward takes a cache, and whether it can skip the prompt's logits (which
        # the shared prefill does not need: the last token, read by `generate`, gives the first ones)
        self._cache_name = cache_argument(self.model.forward)
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters \
            else {}

    def generate(self, prompts: list[str], *, n: int = 1, max_new_tokens: int = 128, temperature: float = 0.7,
                 top_p: float = 0.9, seed: int = 0, stop: str | None = None, desc: str = "generating") -> list[list[str]]:
        """`n` samples for each prompt (greedy when temperature is 0), cut at `stop` if given.

        Prompts are batched by length (padding a short prompt to a long one's length costs as much as the
        long one), and a batch's prompts are read once for all their `n` samples (`generate`'s
        `num_return_sequences` would read each prompt `n` times)."""
        torch.manual_seed(seed)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False)
        out: list[list[str]] = [[] for _ in prompts]
        groups = length_groups([len(ids) for ids in self.tokenizer(prompts).input_ids], max(1, self.batch_size // n))
        for group in tqdm(groups, desc=desc, disable=not self.progress):
            batch = self.tokenizer([prompts[i] for i in group], return_tensors="pt", padding=True)
            started = time.perf_counter()
            with torch.no_grad():
                ids = self._sample(batch, n, max_new_tokens=max_new_tokens, **sampling)
            self.stats.seconds += time.perf_counter() - started
            new = ids[:, batch["input_ids"].shape[1]:]
            counted = int((new != self.tokenizer.pad_token_id).sum())
            self.stats.tokens += counted
            self.stats.calls += 1
            self.stats.per_call.append(counted)
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            if stop:
                texts = [t.split(stop)[0] for t in texts]
            for k, i in enumerate(group):
                out[i] = [t.strip() for t in texts[k * n:(k + 1) * n]]
        return out

    def _sample(self, batch: dict[str, torch.Tensor], n: int, **options) -> torch.Tensor:
        """`n` continuations of each (left-padded) prompt, grouped by prompt: the prompts but their last
        token are read once, and the cache is repeated for the samples."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if n == 1 or ids.shape[1] < 2:
            return self.model.generate(**batch, num_return_sequences=n, **options)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                   use_cache=True, **self._last_only, **{self._cache_name: cache})
        cache.batch_repeat_interleave(n)
        return self.model.generate(input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                                   **{self._cache_name: cache}, **options)


def length_groups(lengths: list[int], size: int, waste: float = 0.25) -> list[list[int]]:
    """Indices of prompts in batches of at most `size`, shortest first, so that padding adds at most
    `waste` to the tokens a batch reads (a batch is padded to its longest prompt)."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        group = groups[-1] if groups else None
        if group is not None and len(group) < size and (len(group) + 1) * lengths[i] <= (1 + waste) * (total + lengths[i]):
            group.append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups


def sample_response_sets(data: str | Path, out: str | Path, *, model: str | None = None, n: int = 2,
                         prompts: int | None = None, split: str = "all", eval_fraction: float = 0.1, seed: int = 0,
                         max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 0.9,
                         batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """Responses of a policy to the prompts of `data`, written as `{"prompt", "responses"}` rows (the
    response sets MetaRM reads).  `split` picks the prompts a reward trainer given the same file,
    `eval_fraction` and `seed` trains on ("train") or holds out ("eval"), so that a meta set never
    shares a prompt with the held-out pairs; `prompts` draws that many of them (seeded).  A response
    that comes out empty is dropped, and a prompt left with fewer than two is skipped and counted."""
    from steer.template import instruction_of

    from .common import model_dir
    from .data import load_prompts, split_by_prompt

    if split not in ("all", "train", "eval"):
        raise SteerError(f"--split must be all, train or eval, got {split!r}")
    if n < 2:
        raise SteerError(f"a response set needs at least two responses, got --n {n}")
    if not (0 < top_p <= 1 and temperature >= 0):
        raise SteerError(f"--top-p must be in (0, 1] and --temperature at least 0, got {top_p} and {temperature}")
    pool = load_prompts(data)
    if split != "all":
        train, held = split_by_prompt([_Prompted(p) for p in pool], eval_fraction, seed)
        pool = [p.prompt for p in (train if split == "train" else held)]
    if prompts is not None and prompts < len(pool):
        pool = random.Random(seed).sample(pool, prompts)
    if not pool:
        raise SteerError(f"{data}: no prompts on the {split!r} side")
    generator = Generator(model_dir(model), batch_size=batch_size, progress=progress)
    outputs = generator.generate(pool, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed, desc="responses")
    rows, skipped = [], 0
    for prompt, responses in zip(pool, outputs):
        kept = [r for r in responses if r]
        if len(kept) < 2:
            skipped += 1
            continue
        rows.append({"prompt": instruction_of(prompt), "responses": kept})
    if not rows:
        raise SteerError("every prompt got fewer than two non-empty responses; raise --max-new-tokens or --n")
    write_jsonl(out, rows)
    return {"out": str(out), "sets": len(rows), "skipped": skipped, "responses": sum(len(r["responses"]) for r in rows),
            "tokens_per_second": round(generator.stats.tokens_per_second, 1)}


@dataclass(frozen=True)
class _Prompted:
    """A bare prompt where `split_by_prompt` expects a pair: the split reads only `.prompt`."""

    prompt: str
