"""Direct Preference Optimization (arXiv 2305.18290) with TRL's DPOTrainer.

What steer adds to TRL: data checks and the instruction template, CPU-safe defaults, LoRA with the
adapter-disabled model as the reference (no second model in memory), an explicit reference model
for full fine-tuning, held-out metrics, resume, and a faster LM head on CPU: TRL projects every
position of the sequence through the 262k-row output matrix when it runs without Triton, while DPO
only needs the completion positions (`train.lm_head`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .common import (
    TrainOptions,
    load_causal_lm,
    load_tokenizer,
    lora_config,
    model_dir,
    quiet_trainer,
    quiet_transformers,
    resume_from,
    run_and_save,
    trainer_arguments,
    write_metrics,
)
from .data import Example, keep_ends, load_pairs, split_by_prompt
from .intervals import ties_half
from .lm_head import completion_only_head
from .sft import train_sft

log = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
              "sigmoid_norm", "exo_pair", "discopop")
_HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def build_trainer(pairs_train: list, pairs_eval: list, options: TrainOptions, *, beta: float = 0.1,
                  loss_type: str = "sigmoid", label_smoothing: float = 0.0, precompute_ref: bool = False,
                  fast_head: bool = True, callbacks: list | None = None, model=None, tokenizer=None):
    """A configured DPOTrainer (used by `train_dpo` and by the benchmark, which compares heads)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    directory = model_dir(options.model)
    tokenizer = tokenizer or load_tokenizer(directory)
    model = model or load_causal_lm(directory)
    ref_model = None
    if not options.lora:
        # Without a ref_model, TRL reloads the reference from the config's hub id: give it explicitly.
        ref_model = load_causal_lm(directory).eval().requires_grad_(False)
    args = DPOConfig(**trainer_arguments(options, bool(pairs_eval)), beta=beta, loss_type=[loss_type],
                     label_smoothing=label_smoothing, precompute_ref_log_probs=precompute_ref)
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list([p.as_row() for p in pairs_train]),
        eval_dataset=Dataset.from_list([p.as_row() for p in pairs_eval]) if pairs_eval else None,
        peft_config=lora_config(options), callbacks=callbacks,
    )
    quiet_trainer(trainer, options)
    if fast_head:
        completion_only_head(trainer, _HEAD_OUTPUTS)
        if ref_model is not None:
            completion_only_head(trainer.ref_model, ("log_probs",))
    return trainer


def train_dpo(data: str | Path, options: TrainOptions, *, beta: float = 0.1, loss_type: str = "sigmoid",
              label_smoothing: float = 0.0, precompute_ref: bool = False, fast_head: bool = True,
              sft_first: bool = False, callbacks: list | None = None) -> dict[str, Any]:
    """Train with DPO on preference pairs; returns (and writes to `out/metrics.json`) the metrics.

    `sft_first`: fine-tune on the training pairs' chosen responses first (into `out/sft/`), then run
    DPO from that model, which is also the reference: the recipe of the DPO paper, where the
    reference should be close to the distribution the pairs came from."""
    quiet_transformers()
    checkpoint = resume_from(options)
    tokenizer = load_tokenizer(model_dir(options.model))
    loaded = load_pairs(data, options.limit)
    # as for reward models: a long prompt loses its start, the responses (and their EOS) stay whole
    pairs, cut, too_long = keep_ends(loaded, tokenizer, options.max_length)
    train, evaluation = split_by_prompt(pairs, options.eval_fraction, options.seed)
    if cut:
        log.info("%d prompts lose their start to fit --max-length %d", cut, options.max_length)
    if too_long:
        log.warning("%d pairs' responses are longer than --max-length %d and are left out", too_long,
                    options.max_length)
    sft = _sft_on_chosen(train, options) if sft_first else None
    if sft is not None:
        options = replace(options, model=sft["model"])
    trainer = build_trainer(train, evaluation, options, beta=beta, loss_type=loss_type,
                            label_smoothing=label_smoothing, precompute_ref=precompute_ref, fast_head=fast_head,
                            callbacks=callbacks, tokenizer=tokenizer)
    metrics = {
        "trainer": "dpo", "data": str(data), "pairs": {"train": len(train), "eval": len(evaluation),
                                                       "too_long": too_long, "prompt_cut": cut,
                                                       "kept_share": len(pairs) / len(loaded)},
        "settings": {**options.as_dict(), "beta": beta, "loss_type": loss_type, "label_smoothing": label_smoothing,
                     "precompute_ref": precompute_ref, "sft_first": sft_first},
        **({"sft": {k: sft[k] for k in ("train", "eval_before", "eval", "model")}} if sft is not None else {}),
        **run_and_save(trainer, tokenizer, options, checkpoint, bool(evaluation),
                       **_evaluation(loss_type, len(evaluation))),
    }
    write_metrics(options.out, metrics)
    return metrics


def _evaluation(loss_type: str, pairs: int) -> dict[str, Any]:
    """How `run_and_save` evaluates: for the sigmoid loss, one pass of our own and nothing before
    training; for TRL's other losses, TRL's `evaluate` and our pair metrics."""
    if loss_type == "sigmoid" and pairs:
        return {"held_out": sigmoid_evaluation, "known_before": _before_training(pairs), "trainer_evaluates": False}
    return {"held_out": pair_accuracy}


def _sft_on_chosen(train: list, options: TrainOptions) -> dict[str, Any]:
    """SFT on (prompt, chosen) of the training pairs into `out/sft/` with the same options (its metrics;
    a finished one is reused when resuming)."""
    out = Path(options.out) / "sft"
    if (out / "model" / "config.json").exists() and (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    examples = [Example(p.prompt, p.chosen, p.source) for p in train]
    return train_sft(examples, replace(options, out=str(out), resume=options.resume and out.exists()))


def held_out_log_probs(trainer) -> dict[str, torch.Tensor]:
    """log π and log π_ref of every held-out pair's chosen and rejected completion (`chosen`,
    `rejected`, `ref_chosen`, `ref_rejected`), in order in one process; with several, each reads its
    shard and all get every pair (the padding that evens out the shards dropped)."""
    model = trainer.model
    reference = trainer.ref_model if trainer.ref_model is not None else model
    training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": [], "ref_chosen": [], "ref_rejected": []}
    try:
        for batch in trainer.get_eval_dataloader():
            inputs = trainer._prepare_inputs(batch)
            ref_chosen, ref_rejected = trainer.compute_ref_log_probs(reference, inputs)
            chosen, rejected = _completion_log_probs(model, inputs)
            for name, value in zip(parts, (chosen, rejected, ref_chosen, ref_rejected)):
                parts[name].append(trainer.accelerator.gather_for_metrics(value.float()))
    finally:
        model.train(training)
    return {name: torch.cat(values).cpu() for name, values in parts.items()}


def held_out_margins(trainer) -> torch.Tensor:
    """The implicit reward margin β[(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))] of every
    held-out pair.  Before training (LoRA: the policy is the reference) every margin is 0."""
    chosen, rejected = _implicit_rewards(trainer, held_out_log_probs(trainer))
    return chosen - rejected


def _implicit_rewards(trainer, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """β(log π - log π_ref) of the chosen and of the rejected completions (see `held_out_log_probs`)."""
    return trainer.beta * (p["chosen"] - p["ref_chosen"]), trainer.beta * (p["rejected"] - p["ref_rejected"])


def _completion_log_probs(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and the rejected completions under `model` (the policy),
    read the way TRL reads the reference's."""
    kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with torch.no_grad():
        log_probs = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True).log_probs
    width = inputs["completion_mask"].size(1) - 1
    return log_probs[:, -width:].sum(1).chunk(2)


def _before_training(pairs: int) -> dict[str, Any]:
    """The held-out metrics before the first step, known without a pass (about as long as the one after
    training): the policy starts as its reference (LoRA's zero adapter, or the frozen copy), so every
    implicit reward margin is 0 and the sigmoid loss is ln 2 (TRL counts a tie as a wrong answer)."""
    return {"eval_loss": math.log(2), "eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0,
            **ties_half([0.0] * pairs), "pair_margin": 0.0}


def pair_accuracy(trainer) -> dict[str, Any]:
    """Held-out preference accuracy of the implicit reward with ties counted half (TRL counts a tie as
    wrong, so an untrained LoRA policy, all ties, scored 0.0), its 95% bootstrap interval and the
    share of ties."""
    return _pair_metrics(held_out_margins(trainer))


def _pair_metrics(margins: torch.Tensor) -> dict[str, Any]:
    return {**ties_half(margins.tolist()), "pair_margin": float(margins.mean())}


def sigmoid_evaluation(trainer) -> dict[str, Any]:
    """The held-out metrics of the sigmoid (DPO) loss from one pass over the pairs, in TRL's names:
    the pass that `pair_accuracy` makes anyway gives TRL's loss, reward and log-probability metrics
    (not its entropy, logits and token-accuracy diagnostics), so `trainer.evaluate()`, a second pass
    as long (half an hour on 433 HH-RLHF pairs on one core), is not run."""
    p = held_out_log_probs(trainer)
    chosen, rejected = _implicit_rewards(trainer, p)
    margins = chosen - rejected
    return {"eval_loss": float(-F.logsigmoid(margins).mean()), "eval_rewards/chosen": float(chosen.mean()),
            "eval_rewards/rejected": float(rejected.mean()),
            "eval_rewards/accuracies": float((chosen > rejected).float().mean()),
            "eval_rewards/margins": float(margins.mean()), "eval_logps/chosen": float(p["chosen"].mean()),
            "eval_logps/rejected": float(p["rejected"].mean()), **_pair_metrics(margins)}
