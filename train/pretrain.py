"""Causal-LM pretraining on packed windows (the output of `steer train icp-order`), so an ordering is
trained on, not only produced: continued pretraining of a model directory, or a small model from a
config trained from scratch.

A model from scratch has no use for the 262k-entry vocabulary of the default tokenizer: its output
layer alone would cost more than the rest of a few-million-parameter model. So `--config` models get
a vocabulary of only the token ids that occur in the *training* windows, plus one UNK row for every
other token (recorded in `vocabulary.json` beside the model, with the tokenizer); the windows are
re-numbered into it.  Evaluation windows never shape the vocabulary: their unseen tokens become UNK,
and the metrics say how many there were, since a perplexity over UNK is not one over the real tokens.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from steer.files import atomic_write_text
from steer.jsonl import DataError, read_jsonl

from .common import (
    TrainOptions,
    is_main_process,
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
from .data import held_out

log = logging.getLogger(__name__)

VOCABULARY = "vocabulary.json"
CONFIGS: dict[str, dict[str, int]] = {
    # ~4.6M parameters with a 25k-token data vocabulary: minutes per epoch of the vendored corpus on 2 cores.
    "small": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32},
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 16},
}


def load_windows(path: str | Path) -> list[list[int]]:
    """Token windows from `windows.jsonl` (rows with `input_ids`), a `datasets` Arrow directory, or an
    `icp-order` output directory holding either."""
    path = Path(path)
    if path.is_dir():
        if (path / "windows.jsonl").is_file():
            path = path / "windows.jsonl"
        elif (path / "windows").is_dir():
            path = path / "windows"
    if path.is_dir():
        from datasets import load_from_disk

        try:
            data = load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{path}: neither windows.jsonl nor a datasets directory") from None
        if "input_ids" not in data.column_names:
            raise DataError(f"{path}: the dataset has no 'input_ids' column")
        return [list(map(int, ids)) for ids in data["input_ids"]]
    windows = []
    for number, row in read_jsonl(path):
        ids = row.get("input_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise DataError(f"{path}:{number}: field 'input_ids' must be a non-empty list of token ids")
        windows.append(ids)
    lengths = {len(w) for w in windows}
    if len(lengths) > 1:
        raise DataError(f"{path}: windows have different lengths ({sorted(lengths)[:5]}...): pack them first")
    return windows


def small_model(name: str, vocab_size: int, window: int, tokenizer, seed: int):
    """A freshly initialised Gemma-3-style model of the named size (full attention in every layer)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    if name not in CONFIGS:
        raise DataError(f"unknown model config {name!r}: choose one of {', '.join(CONFIGS)}")
    sizes = CONFIGS[name]
    config = Gemma3TextConfig(vocab_size=vocab_size, max_position_embeddings=max(window, 512),
                              layer_types=["full_attention"] * sizes["num_hidden_layers"], sliding_window=window,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True, **sizes)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def data_vocabulary(windows: list[list[int]], tokenizer) -> np.ndarray:
    """The sorted token ids that occur in `windows` (the training windows only), plus the tokenizer's
    special tokens.  The model has one more row, `len(vocabulary)`, for every other token (UNK)."""
    seen = np.unique(np.concatenate([np.asarray(w) for w in windows]))
    specials = [t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None]
    return np.union1d(seen, specials)


def renumber(windows: list[list[int]], vocabulary: np.ndarray) -> tuple[list[list[int]], int]:
    """`windows` in the data vocabulary's numbering, and how many tokens became UNK (`len(vocabulary)`)."""
    ids = np.asarray(windows)
    if ids.size == 0:
        return [], 0
    position = np.searchsorted(vocabulary, ids).clip(max=len(vocabulary) - 1)
    known = vocabulary[position] == ids
    return np.where(known, position, len(vocabulary)).tolist(), int((~known).sum())


def pretrain(data: str | Path, options: TrainOptions, *, config: str | None = None,
             eval_data: str | Path | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Train on the windows in `data` with the causal-LM loss; writes the model and `metrics.json` to
    `options.out`. Held-out perplexity comes from `eval_data` (windows) or a share of `data`."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    quiet_transformers()
    checkpoint = resume_from(options)
    windows = load_windows(data)[:options.limit]
    if eval_data is not None:
        train, evaluation = windows, load_windows(eval_data)
    else:
        train, evaluation = held_out(windows, options.eval_fraction, options.seed)
    if not train:
        raise DataError(f"{data}: no training windows left")
    window = len(train[0])
    tokenizer = load_tokenizer(model_dir(options.model if config is None else None))
    if config is None:
        model = load_causal_lm(model_dir(options.model))
        vocabulary = None
    else:
        vocabulary = data_vocabulary(train, tokenizer)
        train, _ = renumber(train, vocabulary)
        evaluation, unknown = renumber(evaluation, vocabulary)
        model = small_model(config, len(vocabulary) + 1, window, tokenizer, options.seed)  # + the UNK row
    if options.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(options))
    arguments = {k: v for k, v in trainer_arguments(options, bool(evaluation)).items() if k != "max_length"}
    trainer = Trainer(
        model=model, args=TrainingArguments(**arguments),
        train_dataset=Dataset.from_dict({"input_ids": train, "labels": train}),
        eval_dataset=Dataset.from_dict({"input_ids": evaluation, "labels": evaluation}) if evaluation else None,
        callbacks=callbacks,
    )
    quiet_trainer(trainer, options)
    metrics = {
        "trainer": "pretrain", "data": str(data), "config": config,
        "windows": {"train": len(train), "eval": len(evaluation), "length": window},
        "tokens": {"train": len(train) * window, "vocabulary": len(vocabulary) if vocabulary is not None else None},
        **({"eval_unknown_tokens": {"count": unknown, "share": unknown / max(1, len(evaluation) * window),
                                    "note": "eval tokens never seen in training are scored as one UNK token"}}
           if vocabulary is not None and evaluation else {}),
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": options.as_dict(),
    }
    metrics.update(run_and_save(trainer, tokenizer, options, checkpoint, bool(evaluation)))
    for key in ("eval_before", "eval"):
        if metrics.get(key):
            metrics[key]["perplexity"] = math.exp(metrics[key]["eval_loss"])
    if vocabulary is not None and is_main_process():
        atomic_write_text(Path(metrics["model"]) / VOCABULARY,
                          json.dumps({"token_ids": vocabulary.tolist(), "unk": len(vocabulary)}))
    write_metrics(options.out, metrics)
    return metrics


def perplexity(model_path: str | Path, windows: list[list[int]], batch_size: int = 4) -> float:
    """exp(mean next-token loss) of a saved model over `windows` (renumbered into its data
    vocabulary when it has one, unseen tokens as UNK): the held-out number `pretrain` reports, for any
    set of windows."""
    import torch
    from transformers import AutoModelForCausalLM

    model_path = Path(model_path)
    ids = np.asarray(windows)
    if (model_path / VOCABULARY).is_file():
        vocabulary = np.asarray(json.loads((model_path / VOCABULARY).read_text())["token_ids"])
        renumbered, unknown = renumber(ids, vocabulary)
        if unknown:
            log.info("%d of %d tokens are outside the training vocabulary: scored as UNK", unknown, ids.size)
        ids = np.asarray(renumbered)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = torch.as_tensor(ids[start:start + batch_size])
            loss = model(batch, labels=batch).loss.item()
            n = batch[:, 1:].numel()
            total, count = total + loss * n, count + n
    return math.exp(total / count)
