"""Reward models and LLM judges as potentials: steer toward p_LM(x) * exp(r(x) / temperature).

A reward model is any sequence-classification checkpoint with one output (what `steer train reward`
writes); a judge is a causal LM scoring with the additive 5-point judge prompt (`JudgeModel`).
Within a program, `await model.guide(self, instruction, text, final=done)` twists the particle by
r(partial text) / T while it is being written (a heuristic that only guides resampling) and scores
r(complete text) / T once it is done (which changes the target).  Every particle's request
of a round is scored in one batch, and repeated texts (resampled copies) are scored once.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .distributions import Distribution, NextToken
from .errors import ModelLoadError, SteerError
from .lm.hf import place
from .randomness import categorical
from .scheduler import AllOf, Request
from .template import format_prompt, judge_instruction


class ScoreRequest(Request):
    """A request for a score of (instruction, response), served in a batch by its scoring model."""

    __slots__ = ("model", "instruction", "response")

    def __init__(self, model: ScoringModel, instruction: str, response: str):
        self.model, self.instruction, self.response = model, instruction, response

    @property
    def server(self) -> ScoringModel:
        return self.model


class ScoringModel:
    """Scores responses to instructions in batches, with a cache; subclasses say how one batch is scored."""

    temperature: float = 1.0

    def __init__(self, *, temperature: float, batch_size: int, cache_size: int):
        if temperature <= 0:
            raise SteerError(f"a potential's temperature must be positive, got {temperature}")
        self.temperature, self.batch_size = float(temperature), batch_size
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._cache_size = cache_size

    def __deepcopy__(self, memo: dict) -> ScoringModel:  # particles share one model
        return self

    def _score_batch(self, pairs: list[tuple[str, str]]) -> list[float]:
        raise NotImplementedError

    def rewards(self, instructions: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The score of each (instruction, response), in batches; cached by text."""
        keys = list(zip(instructions, responses))
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            for key, value in zip(chunk, self._score_batch(chunk)):
                self._cache[key] = value
        result = [self._cache[k] for k in keys]
        for key in keys:
            self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result

    def serve(self, requests: Sequence[ScoreRequest]) -> None:
        values = self.rewards([r.instruction for r in requests], [r.response for r in requests])
        for request, value in zip(requests, values):
            request.result = value

    async def reward(self, instruction: str, response: str) -> float:
        """The score of (instruction, response), batched with the other particles of this round."""
        return await ScoreRequest(self, instruction, response)

    async def guide(self, particle: Any, instruction: str, response: str, *, final: bool) -> float:
        """Twist `particle` by score/T while the response is partial; score it by score/T once `final`.

        The twists telescope away, so the target is p_LM(x) * exp(score(x)/T) over complete texts."""
        value = await self.reward(instruction, response) / self.temperature
        if final:
            particle.score(value)
        else:
            particle.twist(value)
        return value


    def look_ahead(self, context: Any, instruction: str, k: int = 8) -> LookAhead:
        """A one-step look-ahead proposal for the next token of `context`: see `LookAhead`."""
        return LookAhead(self, context, instruction, k)


class LookAhead(Distribution):
    """The model's next token, tilted by how each of its `k` likeliest candidates changes the score:
    q(x) ∝ p(x) · exp((r(text + x) - r(text)) / T) for the top k, p(x) for the rest.

    Use it as a proposal against `ctx.next_token()` (with `guide` for the target's twist and score):
    the weight p(x) / q(x) keeps the target exact, and the scores of every particle's candidates are
    computed in one batch per round.  It is the one-step version of twisted SMC's look-ahead (Zhao et
    al. 2024): it sees a reward change only where the reward model can already tell after one token.
    """

    def __init__(self, model: ScoringModel, context: Any, instruction: str, k: int = 8):
        if k < 1:
            raise SteerError(f"look_ahead needs k >= 1, got {k}")
        self.model, self.context, self.instruction, self.k = model, context, instruction, k
        self._logq: torch.Tensor | None = None

    async def _proposal(self) -> torch.Tensor:
        if self._logq is None:
            ctx = self.context
            logprobs = (await ctx.next_logprobs()).double()
            mask = NextToken(ctx)._mask()
            if mask is not None:
                logprobs = logprobs.masked_fill(~mask, float("-inf"))
            top = torch.topk(logprobs, min(self.k, int(torch.isfinite(logprobs).sum()))).indices.tolist()
            eos = ctx.lm.vocab.eos_ids
            texts = [ctx.text if i in eos else _after(ctx, i) for i in top]
            now, *scores = await AllOf([ScoreRequest(self.model, self.instruction, t) for t in [ctx.text, *texts]])
            tilt = torch.zeros_like(logprobs)
            tilt[top] = (torch.tensor(scores, dtype=torch.float64) - now) / self.model.temperature
            self._logq = torch.log_softmax(logprobs + tilt, 0)
        return self._logq

    async def sample(self) -> tuple[Any, float]:
        logq = await self._proposal()
        token_id = int(categorical(logq.exp()))
        return self.context.token(token_id), logq[token_id].item()

    async def log_prob(self, value: Any) -> float:
        return (await self._proposal())[int(value)].item()

    def commit(self, value: Any) -> None:
        self.context.extend([int(value)])


def _after(context: Any, token_id: int) -> str:
    """The context's text once `token_id` follows (the backed-off prompt text is not part of it)."""
    new = context.lm.vocab.strings[token_id]
    if context.heal:
        new = new[len(context.heal):]
    return context.text + new


def _load(directory: Path, auto_class: str, device: str | None):
    import transformers

    if not (directory / "config.json").exists():
        raise ModelLoadError(f"not a model directory (no config.json): {directory}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = getattr(transformers, auto_class).from_pretrained(
            directory, local_files_only=True, use_safetensors=True, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {directory}: {str(e).splitlines()[0]}") from e
    model = place(model, device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


class RewardModel(ScoringModel):
    """A reward-model checkpoint (one-output sequence classifier, as `steer train reward` writes):
    r(instruction, response) on the text laid out in steer's instruction template."""

    def __init__(self, path: str | os.PathLike, *, temperature: float = 1.0, max_length: int = 512,
                 batch_size: int = 16, cache_size: int = 4096, device: str | None = None):
        super().__init__(temperature=temperature, batch_size=batch_size, cache_size=cache_size)
        self.path = Path(path)
        self.tokenizer, self.model = _load(self.path, "AutoModelForSequenceClassification", device)
        if self.model.config.num_labels != 1:
            raise ModelLoadError(f"{self.path} has {self.model.config.num_labels} outputs; a reward model has one")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = max_length
        self._warned = False

    def _score_batch(self, pairs: list[tuple[str, str]]) -> list[float]:
        return self.score_laid_out([format_prompt(i) for i, _ in pairs], [r for _, r in pairs])

    def score_laid_out(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """r of each response to a prompt already in the instruction template (one batch, uncached)."""
        # Scored as a finished text ending in EOS, as reward models are trained (TRL appends EOS).
        texts = [p + r + self.tokenizer.eos_token for p, r in zip(prompts, responses)]
        batch, cut = reward_batch(self.tokenizer, texts, self.max_length)
        if cut and not self._warned:
            warnings.warn(f"reward model {self.path.name}: a text is longer than max_length={self.max_length} "
                          "tokens; the start of its prompt is cut (the response's end is kept). Raise max_length "
                          "to score such texts whole.", stacklevel=4)
            self._warned = True
        with torch.no_grad():
            return self.model(**batch.to(self.model.device)).logits[:, 0].tolist()


def reward_batch(tokenizer, texts: Sequence[str], max_length: int) -> tuple[Any, int]:
    """`texts` tokenized and padded for a reward head, and how many were cut.  A text longer than
    `max_length` tokens loses the start of its prompt, not its end: the head reads the response's last
    tokens and the EOS it pools (a BOS token stays first)."""
    bos, rows, cut = tokenizer.bos_token_id, [], 0
    for ids in tokenizer(list(texts))["input_ids"]:
        if len(ids) > max_length:
            cut += 1
            head = [bos] if bos is not None and ids[0] == bos else []
            ids = head + ids[len(ids) - max_length + len(head):]
        rows.append(ids)
    return tokenizer.pad({"input_ids": rows}, return_tensors="pt"), cut


class JudgeModel(ScoringModel):
    """A causal LM as its own judge (LLM-as-a-Judge with the additive 5-point prompt): the expected
    score, sum_k k * p(k | judge prompt, "Score: ") over k = 0..5, from one forward pass.

    Reading the score's distribution instead of sampling a rationale makes the potential smooth and
    deterministic, and costs one batched forward pass per step."""

    def __init__(self, path: str | os.PathLike, *, temperature: float = 1.0, batch_size: int = 8,
                 cache_size: int = 4096, device: str | None = None):
        super().__init__(temperature=temperature, batch_size=batch_size, cache_size=cache_size)
        self.path = Path(path)
        self.tokenizer, self.model = _load(self.path, "AutoModelForCausalLM", device)
        self.tokenizer.padding_side = "left"
        digits = [self.tokenizer(str(k), add_special_tokens=False)["input_ids"] for k in range(6)]
        if any(len(d) != 1 for d in digits):
            raise ModelLoadError(f"{self.path}: the judge needs the digits 0-5 to be single tokens")
        self.digits = torch.tensor([d[0] for d in digits])

    def _score_batch(self, pairs: list[tuple[str, str]]) -> list[float]:
        texts = [format_prompt(judge_instruction(i, r)) + "Score: " for i, r in pairs]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True)
        # Left padding: positions count real tokens only, so a text scores the same in any batch.
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        device = self.model.device
        with torch.no_grad():
            logits = self.model(**batch.to(device), position_ids=positions.to(device)).logits[:, -1]
        probs = torch.softmax(logits[:, self.digits].double().cpu(), -1)
        return (probs * torch.arange(6, dtype=torch.float64)).sum(-1).tolist()


def load_potential(path: str | os.PathLike, **options: Any) -> ScoringModel:
    """A reward model (sequence classifier) or, for a causal LM, the model as a judge."""
    import json

    config = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").exists() else {}
    if any(a.endswith("ForCausalLM") for a in config.get("architectures", [])):
        return JudgeModel(path, **options)
    return RewardModel(path, **options)
