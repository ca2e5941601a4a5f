"""Supervised fine-tuning with TRL's SFTTrainer, on templated prompt/completion pairs.

The loss is on completion tokens only (the prompt is given, not learnt), and every completion ends
with EOS, so a tuned model stops by itself when it is steered or sampled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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
from .data import Example, fit_length, held_out, load_examples
from .lm_head import completion_only_head

log = logging.getLogger(__name__)


def train_sft(data: str | Path | list[Example], options: TrainOptions, *,
              callbacks: list | None = None) -> dict[str, Any]:
    """Fine-tune on instruction data (a JSONL path or loaded examples); writes `out/metrics.json`."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    quiet_transformers()
    checkpoint = resume_from(options)
    examples = load_examples(data, options.limit) if isinstance(data, (str, Path)) else list(data)
    directory = model_dir(options.model)
    tokenizer = load_tokenizer(directory)
    examples, truncated = fit_length(examples, tokenizer, options.max_length, ("completion",))
    train, evaluation = held_out(examples, options.eval_fraction, options.seed, group=lambda e: e.group)
    if truncated:
        log.warning("%d of %d examples are longer than --max-length %d: their completions are truncated",
                    truncated, len(examples), options.max_length)
    args = SFTConfig(**trainer_arguments(options, bool(evaluation)), completion_only_loss=True)
    trainer = SFTTrainer(
        model=load_causal_lm(directory), args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list([e.as_row() for e in train]),
        eval_dataset=Dataset.from_list([e.as_row() for e in evaluation]) if evaluation else None,
        peft_config=lora_config(options), callbacks=callbacks,
    )
    quiet_trainer(trainer, options)
    completion_only_head(trainer, ("log_probs", "entropy", "is_top1"))
    metrics = {
        "trainer": "sft", "data": str(data) if isinstance(data, (str, Path)) else f"{len(examples)} examples",
        "examples": {"train": len(train), "eval": len(evaluation), "truncated": truncated},
        "settings": options.as_dict(),
        **run_and_save(trainer, tokenizer, options, checkpoint, bool(evaluation)),
    }
    write_metrics(options.out, metrics)
    return metrics
