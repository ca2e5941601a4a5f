"""Reward models ("Secrets of RLHF II", arXiv 2401.06080): Bradley-Terry training with TRL's
RewardTrainer, plus the paper's strength-driven mitigations.

What steer adds to TRL: label smoothing in the Bradley-Terry loss (TRL has margins but not
smoothing), the paper's contrastive loss on the pairs' difference representations, label flipping
and adaptive margins computed from a preference-strength file written by `train.strength`, and
held-out accuracy before and after.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from steer.errors import SteerError
from steer.files import atomic_path
from steer.potentials import reward_batch

from .common import (
    TrainOptions,
    load_tokenizer,
    lora_config,
    model_dir,
    quiet_trainer,
    quiet_transformers,
    resume_from,
    train_from,
    train_log,
    trainer_arguments,
    wait_for_everyone,
    write_metrics,
)
from .data import DataError, Pair, ResponseSet, keep_ends, load_pairs, load_response_sets, split_by_prompt
from .intervals import ties_half

log = logging.getLogger(__name__)


def pair_id(pair: Pair) -> str:
    """A stable id of a pair's content (so strength files survive reordering and renamed files)."""
    return hashlib.sha1("\0".join((pair.prompt, pair.chosen, pair.rejected)).encode()).hexdigest()[:16]


def load_reward_backbone(directory: Path):
    """A causal LM checkpoint with a fresh one-output score head (or a reward checkpoint as it is).

    A fresh head starts at zero: every reward 0, every pair a tie, the loss ln 2.  A randomly drawn
    head starts with margins of one or two nats that training first has to undo (an eval loss above
    ln 2 after the first steps)."""
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(
        directory, num_labels=1, dtype=torch.float32, local_files_only=True, use_safetensors=True,
        output_loading_info=True)
    fresh = {key.split(".")[0] for key in info["missing_keys"]}
    with torch.no_grad():
        for name in fresh & {"score", "classifier"}:
            for parameter in getattr(model, name).parameters():
                parameter.zero_()
    return model


def _reward_trainer_class():
    from trl import RewardTrainer

    class SteerRewardTrainer(RewardTrainer):
        """TRL's RewardTrainer with two additions to the Bradley-Terry loss.

        Label smoothing: the pair's label is right with probability 1 - eps,
        loss = -(1-eps) log s(d - m) - eps log s(m - d), d = r(chosen) - r(rejected), m the margin.

        Contrastive learning ("Secrets of RLHF II", section 4; SimCSE): the pair's difference
        representation h(chosen) - h(rejected), read where the reward is read, is seen twice through
        dropout, and an InfoNCE loss (weight `contrastive`, temperature `contrastive_temperature`) asks
        each view to pick its twin out of the batch: the representation has to tell pairs apart
        beyond the one direction the score head reads.
        """

        label_smoothing = 0.0
        contrastive = 0.0
        contrastive_temperature = 0.05
        contrastive_dropout = 0.1
        meta: MetaSet | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            """With a meta set (MetaRM): the step's Bradley-Terry gradient is taken at θ' = θ + η ∇J(θ),
            one ascent step on the difference loss J over shifted-distribution responses, and then
            applied to θ (first-order meta-learning: the data that also sharpen J weigh more)."""
            if self.meta is None:
                return super().training_step(model, inputs, num_items_in_batch)
            params = [p for p in model.parameters() if p.requires_grad]
            difference = self.meta.difference_loss(model, self.processing_class, self.args.max_length or 1024)
            ascent = torch.autograd.grad(difference, params, allow_unused=True)
            self._metrics["train"]["meta_difference"].append(difference.item())
            moved = [(p, p.detach().clone()) for p, g in zip(params, ascent) if g is not None]
            with torch.no_grad():
                for (p, _), g in zip(moved, (g for g in ascent if g is not None)):
                    p.add_(g, alpha=self.meta.lr)
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                with torch.no_grad():  # back to θ exactly (θ' - η g need not round to θ)
                    for p, saved in moved:
                        p.copy_(saved)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            contrast = self.contrastive > 0 and model.training
            if contrast:
                inputs["output_hidden_states"] = True
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            if self.label_smoothing:
                chosen, rejected = outputs.logits.squeeze(-1).chunk(2)
                d = chosen - rejected - inputs.get("margin", 0.0)
                eps = self.label_smoothing
                loss = -((1 - eps) * F.logsigmoid(d) + eps * F.logsigmoid(-d)).mean()
                if self.args.center_rewards_coefficient is not None:
                    loss = loss + self.args.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
            if contrast:
                differences = difference_representations(outputs.hidden_states[-1], inputs["attention_mask"])
                views = [F.dropout(differences, self.contrastive_dropout, training=True) for _ in range(2)]
                loss = loss + self.contrastive * info_nce(*views, self.contrastive_temperature)
                outputs.hidden_states = None  # not kept past the step
            return (loss, outputs) if return_outputs else loss

    return SteerRewardTrainer


class MetaSet:
    """MetaRM's meta set (Dou et al. 2024, "MetaRM: Shifted Distributions Alignment via Meta-Learning";
    "Secrets of RLHF II", section 5): unlabelled responses of the policy being trained, drawn `batch`
    prompts at a time in a seeded order, and the step size `lr` of the ascent on their difference loss."""

    def __init__(self, sets: list[ResponseSet], lr: float, batch: int = 4, seed: int = 0):
        if not sets:
            raise SteerError("MetaRM needs at least one response set")
        if not lr > 0:
            raise SteerError(f"--meta-lr must be positive, got {lr}")
        self.sets, self.lr, self.batch = sets, lr, batch
        self._order: list[int] = []
        self._random = random.Random(seed)

    def next_batch(self) -> list[ResponseSet]:
        out = []
        while len(out) < min(self.batch, len(self.sets)):
            if not self._order:
                self._order = list(range(len(self.sets)))
                self._random.shuffle(self._order)
            out.append(self.sets[self._order.pop()])
        return out

    def difference_loss(self, model, tokenizer, max_length: int, sets: list[ResponseSet] | None = None) -> torch.Tensor:
        """J = mean over prompts of mean over response pairs i < j of sigmoid(|r(x, s_i) - r(x, s_j)|):
        large when the reward model tells the responses to one prompt apart."""
        sets = self.next_batch() if sets is None else sets
        texts = [s.prompt + r + tokenizer.eos_token for s in sets for r in s.responses]
        batch = reward_batch(tokenizer, texts, max_length)[0].to(model.device)
        rewards = model(**batch, use_cache=False).logits[:, 0]
        terms, start = [], 0
        for s in sets:
            r = rewards[start:start + len(s.responses)]
            start += len(s.responses)
            i, j = torch.triu_indices(len(r), len(r), offset=1)
            terms.append(torch.sigmoid((r[i] - r[j]).abs()).mean())
        return torch.stack(terms).mean()


def difference_representations(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """h(chosen) - h(rejected) per pair, h the last layer's state at each sequence's last token (where
    the score head reads the reward); the batch holds the chosen sequences, then the rejected."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask).argmax(-1)
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    chosen, rejected = h.chunk(2)
    return chosen - rejected


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with in-batch negatives: row i of `a` should be closest (cosine) to row i of `b`."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def read_strength(path: str | Path) -> dict[str, dict[str, Any]]:
    """pair id -> its strength record, from a `strength.jsonl` written by `train.strength`."""
    from .data import read_jsonl

    records = {}
    for number, row in read_jsonl(path):
        if "id" not in row or "mean" not in row:
            raise DataError(f"{path}:{number}: a strength record needs 'id' and 'mean'")
        records[row["id"]] = row
    return records


def apply_mitigations(pairs: list[Pair], strength: dict[str, dict] | None, *, flip_fraction: float = 0.0,
                      adaptive_margin: float = 0.0) -> tuple[list[Pair], list[float] | None, int]:
    """Flip the most negative-strength pairs and/or give every pair a margin of `adaptive_margin` x
    its mean strength.  Returns (pairs, margins or None, number flipped)."""
    if strength is None:
        if flip_fraction or adaptive_margin:
            raise SteerError("--flip and --adaptive-margin need --strength FILE (from `steer train strength`)")
        return pairs, None, 0
    means = []
    for pair in pairs:
        record = strength.get(pair_id(pair))
        if record is None:
            raise SteerError(f"{pair.source}: this pair has no record in the strength file")
        means.append(float(record["mean"]))
    flipped = 0
    if flip_fraction:
        order = sorted(range(len(pairs)), key=lambda i: means[i])
        chosen = [i for i in order[: round(flip_fraction * len(pairs))] if means[i] < 0]
        pairs = list(pairs)
        for i in chosen:
            pairs[i] = replace(pairs[i], chosen=pairs[i].rejected, rejected=pairs[i].chosen)
            means[i] = -means[i]
        flipped = len(chosen)
    margins = [adaptive_margin * m for m in means] if adaptive_margin else None
    return pairs, margins, flipped


def build_reward_trainer(train: list[Pair], evaluation: list[Pair], options: TrainOptions, *,
                         margins: list[float] | None = None, label_smoothing: float = 0.0,
                         contrastive: float = 0.0, meta: MetaSet | None = None, callbacks: list | None = None,
                         tokenizer=None):
    from datasets import Dataset
    from trl import RewardConfig

    directory = model_dir(options.model)
    tokenizer = tokenizer or load_tokenizer(directory)
    model = load_reward_backbone(directory)
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [p.as_row() for p in train]
    if margins is not None:
        rows = [{**row, "margin": m} for row, m in zip(rows, margins)]
    args = RewardConfig(**trainer_arguments(options, bool(evaluation)))
    trainer = _reward_trainer_class()(
        model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list([p.as_row() for p in evaluation]) if evaluation else None,
        peft_config=lora_config(options, task_type="SEQ_CLS"), callbacks=callbacks,
    )
    quiet_trainer(trainer, options)
    trainer.label_smoothing, trainer.contrastive, trainer.meta = label_smoothing, contrastive, meta
    return trainer


def save_reward_model(trainer, tokenizer, out: Path, lora: bool) -> Path:
    """A plain sequence-classification directory that `steer.potentials.RewardModel` loads."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        model = model.merge_and_unload()
    with atomic_path(out / "model") as staging:  # whole or not at all, as every trained model
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return out / "model"


def fit_reward_model(train: list[Pair], evaluation: list[Pair], options: TrainOptions, *,
                     margins: list[float] | None = None, label_smoothing: float = 0.0,
                     contrastive: float = 0.0, meta: MetaSet | None = None, callbacks: list | None = None,
                     resume: str | None = None, before: bool = False, tokenizer=None) -> tuple[Any, dict]:
    """Train one reward model; returns (trainer, held-out metrics: `eval`, and with `before` also
    `eval_before`, measured before the first step)."""
    tokenizer = tokenizer or load_tokenizer(model_dir(options.model))
    trainer = build_reward_trainer(train, evaluation, options, margins=margins, label_smoothing=label_smoothing,
                                   contrastive=contrastive, meta=meta, callbacks=callbacks, tokenizer=tokenizer)
    metrics: dict[str, Any] = {}
    if evaluation and before and resume is None:
        metrics["eval_before"] = evaluate_reward(trainer, tokenizer, evaluation, options.max_length, options.progress)
    started = time.perf_counter()
    result = train_from(trainer, resume)
    metrics.update({"steps": result.global_step, "loss": result.training_loss,
                    "seconds": time.perf_counter() - started, "processes": trainer.args.world_size})
    if evaluation:
        metrics["eval"] = evaluate_reward(trainer, tokenizer, evaluation, options.max_length, options.progress)
    return trainer, metrics


def evaluate_reward(trainer, tokenizer, pairs: list[Pair], max_length: int, progress: bool = True) -> dict[str, Any]:
    """Held-out metrics from one scoring pass: the Bradley-Terry loss -log sigmoid(r_c - r_r), the share
    of positive margins (ties wrong, as TRL counts them), the mean margin, and the pairwise accuracy
    with ties counted half, its 95% interval and the share of ties (all ties for a zero head: 0.5)."""
    if _zero_head(trainer.model):  # every reward is exactly 0: nothing to compute
        diffs = torch.zeros(len(pairs))
    else:
        diffs = score_pairs(trainer.model, tokenizer, pairs, max_length, progress=progress)
    return {"eval_loss": float(F.softplus(-diffs).mean()), "eval_accuracy": float((diffs > 0).float().mean()),
            "eval_margin": float(diffs.mean()), **ties_half(diffs.tolist())}


def _zero_head(model) -> bool:
    """The score head is all zeros (a fresh head, before the first step: every reward is 0)."""
    head = [p for name, p in model.named_parameters() if ".score." in f".{name}"]
    return bool(head) and not any(p.detach().any() for p in head)


def length_baseline(tokenizer, pairs: list[Pair]) -> dict[str, Any]:
    """"Prefer the longer response" (in tokens) on the same pairs: what a reward model must beat."""
    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return ties_half([length(p.chosen) - length(p.rejected) for p in pairs])


def train_reward(data: str | Path, options: TrainOptions, *, label_smoothing: float = 0.0,
                 strength: str | Path | None = None, flip_fraction: float = 0.0, adaptive_margin: float = 0.0,
                 contrastive: float = 0.0, meta_data: str | Path | None = None, meta_lr: float = 1e-3,
                 callbacks: list | None = None) -> dict[str, Any]:
    """Train a reward model on preference pairs; writes the model to `out/model` and `out/metrics.json`.
    `contrastive`: the weight of the contrastive loss beside Bradley-Terry (0: plain Bradley-Terry);
    `meta_data`: response sets of the policy (`{"prompt", "responses"}` rows) for MetaRM, whose ascent
    step on their difference loss is `meta_lr`."""
    quiet_transformers()
    if not 0 <= label_smoothing < 0.5:
        raise SteerError(f"--label-smoothing must be in [0, 0.5), got {label_smoothing}")
    checkpoint = resume_from(options)
    tokenizer = load_tokenizer(model_dir(options.model))
    loaded = load_pairs(data, options.limit)
    pairs, cut, too_long = keep_ends(loaded, tokenizer, options.max_length)
    train, evaluation = split_by_prompt(pairs, options.eval_fraction, options.seed)
    if cut:
        log.info("%d prompts lose their start to fit --max-length %d", cut, options.max_length)
    if too_long:  # the reward is read at the last token, so a response is never cut: the pair is left out
        log.warning("%d pairs' responses are longer than --max-length %d and are left out", too_long,
                    options.max_length)
    records = read_strength(strength) if strength else None
    train, margins, flipped = apply_mitigations(train, records, flip_fraction=flip_fraction,
                                                adaptive_margin=adaptive_margin)
    if contrastive < 0:
        raise SteerError(f"--contrastive must be >= 0, got {contrastive}")
    meta = MetaSet(load_response_sets(meta_data), meta_lr, seed=options.seed) if meta_data else None
    trainer, fit = fit_reward_model(train, evaluation, options, margins=margins, label_smoothing=label_smoothing,
                                    contrastive=contrastive, meta=meta, callbacks=callbacks, resume=checkpoint,
                                    before=True, tokenizer=tokenizer)
    final = Path(options.out) / "model"
    if trainer.is_world_process_zero():
        save_reward_model(trainer, tokenizer, Path(options.out), options.lora)
    wait_for_everyone()
    metrics = {
        "trainer": "reward", "data": str(data),
        "pairs": {"train": len(train), "eval": len(evaluation), "too_long": too_long, "prompt_cut": cut,
                  "kept_share": len(pairs) / len(loaded), "flipped": flipped},
        "settings": {**options.as_dict(), "label_smoothing": label_smoothing, "strength": str(strength or ""),
                     "flip_fraction": flip_fraction, "adaptive_margin": adaptive_margin, "contrastive": contrastive,
                     "meta_data": str(meta_data or ""), "meta_lr": meta_lr if meta_data else None},
        "train": {k: v for k, v in fit.items() if k not in ("eval", "eval_before")},
        "eval_before": fit.get("eval_before"), "eval": fit.get("eval"),
        "length_baseline": length_baseline(tokenizer, evaluation) if evaluation else None,
        "log": train_log(trainer), "model": str(final),
    }
    write_metrics(options.out, metrics)
    return metrics


def score_pairs(model, tokenizer, pairs: list[Pair], max_length: int, batch_size: int = 16,
                progress: bool = False) -> torch.Tensor:
    """r(chosen) - r(rejected) for every pair under a (trained) sequence-classification model."""
    from tqdm.auto import tqdm

    model.eval()
    diffs = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="scoring held-out pairs", unit="batch",
                      disable=not progress):
        chunk = pairs[start:start + batch_size]
        eos = tokenizer.eos_token  # as RewardTrainer appends it in training: the reward is read at EOS
        texts = [p.prompt + p.chosen + eos for p in chunk] + [p.prompt + p.rejected + eos for p in chunk]
        batch = reward_batch(tokenizer, texts, max_length)[0].to(model.device)  # as the reward potential reads them
        with torch.no_grad():
            rewards = model(**batch).logits[:, 0]
        chosen, rejected = rewards.chunk(2)
        diffs.append(chosen - rejected)
    return torch.cat(diffs).cpu()


