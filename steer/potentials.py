"""Reward models as potentials: steer toward p_LM(x) * exp(r(x) / temperature).

A reward model is any sequence-classification checkpoint with one output (what `steer train reward`
writes).  Within a program, `await reward_model.guide(self, instruction, text, final=done)` twists the
particle by r(partial text) / T while it is being written (a heuristic that only guides resampling)
and scores r(complete text) / T once it is done (which changes the target).  Every particle's request
of a round is scored in one batch, and repeated texts (resampled copies) are scored once.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError, SteerError
from .scheduler import Request
from .template import format_prompt


class RewardRequest(Request):
    """A request for r(instruction, response), served in a batch by its reward model."""

    __slots__ = ("instruction", "model", "response")

    def __init__(self, model: RewardModel, instruction: str, response: str):
        self.model, self.instruction, self.response = model, instruction, response

    @property
    def server(self) -> RewardModel:
        return self.model


class RewardModel:
    """A reward-model checkpoint, scoring responses to instructions laid out in steer's template."""

    def __init__(self, path: str | os.PathLike, *, temperature: float = 1.0, max_length: int = 512,
                 batch_size: int = 16, cache_size: int = 4096, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if temperature <= 0:
            raise SteerError(f"a reward temperature must be positive, got {temperature}")
        directory = Path(path)
        if not (directory / "config.json").exists():
            raise ModelLoadError(f"not a reward-model directory (no config.json): {directory}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                directory, local_files_only=True, use_safetensors=True, dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load a reward model from {directory}: {str(e).splitlines()[0]}") from e
        if self.model.config.num_labels != 1:
            raise ModelLoadError(f"{directory} has {self.model.config.num_labels} outputs; a reward model has one")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.path, self.temperature = directory, float(temperature)
        self.max_length, self.batch_size, self.device = max_length, batch_size, device
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._cache_size = cache_size

    def __deepcopy__(self, memo: dict) -> RewardModel:  # particles share one reward model
        return self

    # -- scoring ---------------------------------------------------------------------------------------
    def rewards(self, instructions: Sequence[str], responses: Sequence[str]) -> list[float]:
        """r(x) for each (instruction, response), in batches; cached by text."""
        keys = list(zip(instructions, responses))
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            # Scored as a finished text ending in EOS, as reward models are trained (TRL appends EOS).
            texts = [format_prompt(i) + r + self.tokenizer.eos_token for i, r in chunk]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                   max_length=self.max_length).to(self.device)
            with torch.no_grad():
                values = self.model(**batch).logits[:, 0].tolist()
            for key, value in zip(chunk, values):
                self._cache[key] = value
        result = [self._cache[k] for k in keys]
        for key in keys:
            self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result

    def serve(self, requests: Sequence[RewardRequest]) -> None:
        values = self.rewards([r.instruction for r in requests], [r.response for r in requests])
        for request, value in zip(requests, values):
            request.result = value

    async def reward(self, instruction: str, response: str) -> float:
        """r(instruction, response), batched with the other particles of this round."""
        return await RewardRequest(self, instruction, response)

    async def guide(self, particle: Any, instruction: str, response: str, *, final: bool) -> float:
        """Twist `particle` by r/T while the response is partial; score it by r/T once it is `final`.

        The twists telescope away, so the target is p_LM(x) * exp(r(x)/T) over complete texts."""
        value = await self.reward(instruction, response) / self.temperature
        if final:
            particle.score(value)
        else:
            particle.twist(value)
        return value
