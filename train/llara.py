"""LLaRA (Li et al. 2023, arXiv 2312.15503): adapt a causal LM into a dense retriever with two pretext
tasks, EBAE (embedding-based auto-encoding) and EBAR (embedding-based auto-regression).

A passage is followed by an instruction and a few slot tokens; the mean of the slots' final hidden
states is the passage's embedding. Through the LM head, that embedding must predict the *bag* of
tokens of the passage itself (EBAE: "summarise the passage above") or of the passage that follows it
(EBAR: "predict the passage that follows"), as a multi-label log-softmax over the vocabulary. After
training, passages are embedded with the EBAE prompt and queries with the EBAR prompt
(`retrieval.llm_embedder.LLMEmbedder`), so a query lands near the passages that would follow it.

The slots reuse tokens the tokenizer reserves (Gemma's `<unused…>` tokens), so the vocabulary and
the tied 262k-row embedding matrix stay as they are and LoRA suffices; a tokenizer without reserved
tokens gets new ones (and the embedding matrix is resized and trained).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from retrieval.llm_embedder import (
    LlaraFormat,
    default_format,
    encode,
    pad,
    slot_embeddings,
)
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

def bag_of_words_loss(logits: torch.Tensor, bags: list[list[int]]) -> torch.Tensor:
    """-1/|bag| Σ_{t in bag} log softmax(logits)[t], averaged over the batch: the embedding, through
    the LM head, should put its probability on the tokens of the target text (each distinct token once)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.zeros_like(log_probs)
    for i, bag in enumerate(bags):
        unique = torch.tensor(sorted(set(bag)), dtype=torch.long, device=logits.device)
        target[i, unique] = 1.0 / len(unique)
    return -(target * log_probs).sum(dim=-1).mean()


@dataclass
class PassagePair:
    passage: str
    next: str
    article: str = ""  # pairs of one article stay on one side of the train / eval split


def _link_shared_texts(pairs: list[PassagePair]) -> None:
    """Give pairs without an article one made of the texts they share: (p1, p2) and (p2, p3) hold the
    same paragraph, so they must not be split between training and evaluation."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    loose = [i for i, p in enumerate(pairs) if not p.article]
    texts: dict[str, int] = {}
    rows, cols = [], []
    for n, i in enumerate(loose):
        for text in (pairs[i].passage, pairs[i].next):
            rows.append(n)
            cols.append(len(loose) + texts.setdefault(text, len(texts)))
    size = len(loose) + len(texts)
    graph = coo_matrix(([1] * len(rows), (rows, cols)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    for n, i in enumerate(loose):
        pairs[i].article = f"shared-text-{component[n]}"


def load_passage_pairs(path: str | Path, limit: int | None = None) -> list[PassagePair]:
    """(passage, next passage) pairs: rows with `passage` and `next` (and optionally `article`), or a
    document file whose ids are "article-paragraph" (the vendored Wikipedia): consecutive paragraphs of
    one article pair up.  Each pair knows its article (rows without one: the pairs it shares a text
    with), so that the held-out pairs come from articles never trained on."""
    pairs: list[PassagePair] = []
    previous: tuple[str, int, str] | None = None
    for number, row in read_jsonl(path):
        if "passage" in row:
            for name in ("passage", "next"):
                if not isinstance(row.get(name), str) or not row[name].strip():
                    raise DataError(f"{path}:{number}: field {name!r} must be a non-empty string")
            article = row.get("article", "")
            if not isinstance(article, (str, int)):
                raise DataError(f"{path}:{number}: field 'article' must be a string")
            pairs.append(PassagePair(row["passage"], row["next"], str(article)))
        else:
            text, doc_id = row.get("text"), str(row.get("id", ""))
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{number}: field 'text' must be a non-empty string "
                                "(or give 'passage' and 'next')")
            article, _, paragraph = doc_id.rpartition("-")
            if not article or not paragraph.isdigit():
                raise DataError(f"{path}:{number}: id {doc_id!r} is not 'article-paragraph'; "
                                "give 'passage' and 'next' fields instead")
            if previous and previous[0] == article and previous[1] + 1 == int(paragraph):
                pairs.append(PassagePair(previous[2], text, article))
            previous = (article, int(paragraph), text)
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise DataError(f"{path}: no passage / next-passage pairs")
    _link_shared_texts(pairs)
    return pairs


class LlaraCollator:
    def __init__(self, tokenizer, fmt: LlaraFormat):
        self.tokenizer, self.fmt = tokenizer, fmt

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        fmt, tok = self.fmt, self.tokenizer
        passages = [r["passage"] for r in rows]
        ebae_ids, ebae_mask = pad(encode(tok, passages, fmt.ebae_instruction, fmt.ebae_slots, fmt.max_tokens),
                                  tok.pad_token_id)
        ebar_ids, ebar_mask = pad(encode(tok, passages, fmt.ebar_instruction, fmt.ebar_slots, fmt.max_tokens),
                                  tok.pad_token_id)
        bag = lambda texts: tok(texts, add_special_tokens=False, truncation=True,
                                max_length=fmt.max_tokens)["input_ids"]
        return {"ebae_ids": ebae_ids, "ebae_mask": ebae_mask, "ebar_ids": ebar_ids, "ebar_mask": ebar_mask,
                "own_bag": bag(passages), "next_bag": bag([r["next"] for r in rows])}


def llara_loss(model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """EBAE + EBAR bag-of-words losses of one batch."""
    head = model.get_output_embeddings()
    ebae = bag_of_words_loss(head(slot_embeddings(model, batch["ebae_ids"], batch["ebae_mask"])), batch["own_bag"])
    ebar = bag_of_words_loss(head(slot_embeddings(model, batch["ebar_ids"], batch["ebar_mask"])), batch["next_bag"])
    return ebae + ebar, {"ebae": ebae.item(), "ebar": ebar.item()}


def _trainer_class():
    from transformers import Trainer

    class LlaraTrainer(Trainer):
        """Trainer whose loss is LLaRA's, on batches of passage / next-passage pairs."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, _ = llara_loss(model, inputs)
            return (loss, {"loss": loss}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            with torch.no_grad():
                loss, _ = llara_loss(model, inputs)
            return loss.detach(), None, None

    return LlaraTrainer


def train_llara(data: str | Path | list[PassagePair], options: TrainOptions, *,
                callbacks: list | None = None) -> dict[str, Any]:
    """Adapt `options.model` with LLaRA's pretext tasks; writes `out/model` (+ `llara.json`) and
    `out/metrics.json`. `options.max_length` caps the passage tokens."""
    from datasets import Dataset
    from transformers import TrainingArguments

    quiet_transformers()
    checkpoint = resume_from(options)
    if isinstance(data, (str, Path)):
        pairs = load_passage_pairs(data, options.limit)
    else:
        pairs = [replace(p) for p in data]  # copies: the caller's pairs are not relabelled
        _link_shared_texts(pairs)
    train, evaluation = held_out(pairs, options.eval_fraction, options.seed, group=lambda p: p.article)
    directory = model_dir(options.model)
    tokenizer = load_tokenizer(directory)
    fmt, added = default_format(tokenizer, options.max_length)
    model = load_causal_lm(directory)
    if added:
        model.resize_token_embeddings(len(tokenizer))
    if options.lora:
        from peft import get_peft_model

        config = lora_config(options)
        if added:  # new slot tokens have random embeddings: let them learn
            config.modules_to_save = ["embed_tokens"]
        model = get_peft_model(model, config)
    arguments = {k: v for k, v in trainer_arguments(options, bool(evaluation)).items() if k != "max_length"}
    trainer = _trainer_class()(
        model=model, args=TrainingArguments(**arguments, remove_unused_columns=False),
        train_dataset=Dataset.from_list([asdict(p) for p in train]),
        eval_dataset=Dataset.from_list([asdict(p) for p in evaluation]) if evaluation else None,
        data_collator=LlaraCollator(tokenizer, fmt), callbacks=callbacks,
    )
    quiet_trainer(trainer, options)
    metrics = {"trainer": "llara", "data": str(data) if isinstance(data, (str, Path)) else f"{len(pairs)} pairs",
               "pairs": {"train": len(train), "eval": len(evaluation)},
               "articles": {"train": len({p.article for p in train}), "eval": len({p.article for p in evaluation})},
               "format": asdict(fmt),
               "settings": options.as_dict()}
    metrics.update(run_and_save(trainer, tokenizer, options, checkpoint, bool(evaluation)))
    if is_main_process():
        fmt.save(metrics["model"])
    write_metrics(options.out, metrics)
    return metrics
