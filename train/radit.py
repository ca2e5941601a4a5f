"""RA-DIT (Lin et al. 2023, arXiv 2310.01352): retrieval-augmented dual instruction tuning.

- **LM-ft**: fine-tune the LM on questions with one retrieved chunk prepended at a time
  ("Background: ..."), the loss on the answer tokens only (it is SFT on those prompts).
- **R-ft with LM-supervised retrieval (LSR)**: for each question, score its top-k chunks by the LM's
  length-normalised log-likelihood of the gold answer given chunk + question, turn the scores into a
  target distribution p_LSR with temperature tau, and train the *query* encoder so that the
  retriever's distribution p_R over the same chunks matches it: loss KL(p_R || p_LSR). Passages,
  their embeddings and the index stay as they are.
- **Parallel retrieval-augmented inference**: p(y | x) = Σ_c p_LM(y | c, x) p_R(c | x); for steering
  programs that is `steer.mixture.MixtureContext`, here `parallel_log_likelihood`.

The question sets are cloze questions cut from the vendored Wikipedia paragraphs (`cloze_questions`:
a sentence with one year in it, the year blanked out), so the answer is in the corpus.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval.corpus import Document, load_embeddings
from retrieval.embedders import MINILM, RetrievalError, SentenceEmbedder
from retrieval.retriever import Retriever, background_prompt
from steer.jsonl import DataError, read_jsonl
from steer.template import format_prompt

from .common import (
    TrainOptions,
    load_causal_lm,
    load_tokenizer,
    model_dir,
    write_metrics,
)
from .data import Example, held_out
from .intervals import mean_ci95

log = logging.getLogger(__name__)

YEAR = re.compile(r"\b(1[0-9]{3}|20[0-2][0-9])\b")
QUESTION = "Which year fills the blank? "


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    source: str | None = None  # id of the passage the question was cut from


def cloze_questions(documents: list[Document], limit: int | None = None, seed: int = 0) -> list[QA]:
    """One question per passage that has a sentence (8-40 words) with exactly one year in it."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    questions = []
    for i in order:
        for sentence in re.split(r"(?<=[.!?])\s+", documents[i].text):
            years = YEAR.findall(sentence)
            if len(years) == 1 and 8 <= len(sentence.split()) <= 40:
                questions.append(QA(QUESTION + YEAR.sub("____", sentence), years[0], documents[i].id))
                break
        if limit is not None and len(questions) >= limit:
            break
    return questions


def load_qa(path: str | Path, limit: int | None = None) -> list[QA]:
    rows = []
    for number, row in read_jsonl(path):
        for name in ("question", "answer"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise DataError(f"{path}:{number}: field {name!r} must be a non-empty string")
        rows.append(QA(row["question"], row["answer"], row.get("source")))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def write_qa(path: str | Path, questions: list[QA]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(asdict(q), ensure_ascii=False) + "\n" for q in questions)


# -- LM-ft -------------------------------------------------------------------------------------------
def lm_examples(questions: list[QA], retriever: Retriever, k: int = 2) -> list[Example]:
    """k examples per question, each with one of its top-k chunks as background."""
    examples = []
    for q in questions:
        for hit in retriever.search(q.question, k):
            examples.append(Example(format_prompt(background_prompt([hit.text], q.question)), q.answer, "radit",
                                    group=q.question))  # a question's chunks stay on one side of the split
    return examples


def train_radit_lm(data: str | Path | list[QA], index: str | Path, options: TrainOptions,
                   k: int = 2) -> dict[str, Any]:
    """LM-ft: SFT on retrieval-augmented prompts (loss on the answer only); writes `out/model`."""
    from .sft import train_sft

    questions = load_qa(data, options.limit) if isinstance(data, (str, Path)) else list(data)
    examples = lm_examples(questions, Retriever.load(index), k)
    metrics = train_sft(examples, options)
    metrics.update({"trainer": "radit-lm", "questions": len(questions), "chunks_per_question": k,
                    "split": "by question: every chunk of an eval question is held out"})
    write_metrics(options.out, metrics)
    return metrics


# -- scoring with the LM -----------------------------------------------------------------------------
def answer_log_likelihoods(model, tokenizer, prompts: list[str], answer: str) -> np.ndarray:
    """log p(answer | prompt) / (answer tokens) for each prompt (prompts are templated instructions).

    One unpadded forward pass per prompt, with the LM head applied only where the answer is
    predicted: over a 262k-token vocabulary the head, not the trunk, would dominate otherwise."""
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    n = len(answer_ids)
    scores = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"] + answer_ids])
            logits = model(ids, logits_to_keep=n + 1).logits[0, :-1].float()
            scores.append(torch.log_softmax(logits, -1)[torch.arange(n), answer_ids].sum().item() / n)
    return np.asarray(scores)


def parallel_log_likelihood(model, tokenizer, chunks: list[str], chunk_probs: np.ndarray, question: str,
                            answer: str) -> float:
    """log Σ_c p_R(c | x) p_LM(answer | c, x): the answer's probability under parallel retrieval augmentation."""
    prompts = [format_prompt(background_prompt([c], question)) for c in chunks]
    n = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    total = answer_log_likelihoods(model, tokenizer, prompts, answer) * n
    with np.errstate(divide="ignore"):
        return float(np.logaddexp.reduce(np.log(chunk_probs) + total))


# -- R-ft with LSR -----------------------------------------------------------------------------------
def lsr_loss(retriever_scores: torch.Tensor, lm_scores: torch.Tensor, tau: float = 0.1,
             retriever_tau: float | None = None) -> torch.Tensor:
    """Mean over queries of KL(p_R || p_LSR), p_R = softmax(retriever scores / tau_R) and
    p_LSR = softmax(LM scores / tau), both over the same k chunks of each query."""
    log_p_r = torch.log_softmax(retriever_scores / (retriever_tau or tau), dim=-1)
    log_p_lsr = torch.log_softmax(lm_scores / tau, dim=-1)
    return (log_p_r.exp() * (log_p_r - log_p_lsr)).sum(dim=-1).mean()


QUERY_ENCODER, DUAL = "query_encoder", "dual.json"


def train_radit_retriever(data: str | Path | list[QA], index: str | Path, out: str | Path, *,
                          lm: str | None = None, k: int = 4, tau: float = 0.1, epochs: int = 2,
                          batch_size: int = 8, learning_rate: float = 2e-5, limit: int | None = None,
                          eval_fraction: float = 0.2, eval_questions: list[QA] | None = None, seed: int = 0,
                          progress: bool = True) -> dict[str, Any]:
    """R-ft: train a copy of the index's query encoder on LSR targets from `lm`; writes `out/` as an
    embedder directory (`dual.json` + `query_encoder/`) that `Retriever.load(index, load_embedder(out))`
    uses, with the index's passage vectors unchanged.

    `eval_fraction` of the questions (whole source passages) are held out: the LSR loss and how often the
    LM's preferred chunk is ranked first are reported on them, before and after, as well as on the
    training questions (`eval_questions`, when given, are held out instead: every question of `data`
    trains).  Each question's k candidates are retrieved once, with the original encoder:
    the passage index stays frozen (only the query tower learns, as in RA-DIT), and re-retrieving would
    mean scoring every new candidate with the LM again."""
    questions = load_qa(data, limit) if isinstance(data, (str, Path)) else list(data)
    if eval_questions is None:
        train_q, eval_q = held_out(list(range(len(questions))), eval_fraction, seed,
                                   group=lambda i: questions[i].source or questions[i].question)
    else:
        train_q = list(range(len(questions)))
        eval_q = list(range(len(questions), len(questions) + len(eval_questions)))
        questions = questions + list(eval_questions)
    retriever = Retriever.load(index)
    if retriever.index.meta.embedder != MINILM:
        raise RetrievalError("R-ft trains a sentence-transformers query encoder: build the index with MiniLM")
    passages, _ = load_embeddings(index)
    passages = torch.as_tensor(np.array(passages))
    _, rows = retriever.index.search(retriever.embedder.embed_queries([q.question for q in questions]), k)

    directory = model_dir(lm)
    tokenizer, model = load_tokenizer(directory), load_causal_lm(directory).eval()
    lm_scores = []
    for q, row in tqdm(list(zip(questions, rows)), desc="LSR scores", disable=not progress):
        prompts = [format_prompt(background_prompt([retriever.documents[r].text], q.question)) for r in row]
        lm_scores.append(answer_log_likelihoods(model, tokenizer, prompts, q.answer))
    lm_scores = torch.as_tensor(np.asarray(lm_scores), dtype=torch.float32)
    candidates = torch.as_tensor(rows)
    del model

    torch.manual_seed(seed)
    encoder = SentenceEmbedder().model  # a fresh copy of the query tower; the index's passages stay fixed
    encoder.train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=learning_rate)
    texts = [q.question for q in questions]

    def batch_sims(idx: list[int]) -> torch.Tensor:
        features = encoder.tokenize([texts[i] for i in idx])
        query = torch.nn.functional.normalize(encoder(features)["sentence_embedding"], dim=-1)
        return torch.einsum("bd,bkd->bk", query, passages[candidates[idx]])

    def evaluate(idx: list[int]) -> dict[str, float]:
        """LSR loss over questions `idx`, and how often the retriever ranks the LM's best chunk first."""
        if not idx:
            return {}
        with torch.no_grad():
            sims = torch.cat([batch_sims(idx[s:s + 64]) for s in range(0, len(idx), 64)])
        scores = lm_scores[idx]
        first = (sims.argmax(-1) == scores.argmax(-1)).float().tolist()
        return {"lsr_loss": lsr_loss(sims, scores, tau).item(), "lm_best_ranked_first": float(np.mean(first)),
                "lm_best_ranked_first_ci95": mean_ci95(first)}

    before = {"train": evaluate(train_q), "eval": evaluate(eval_q)}
    history = []
    rng = random.Random(seed)
    for epoch in range(epochs):
        order = list(train_q)
        rng.shuffle(order)
        for start in tqdm(range(0, len(order), batch_size), desc=f"R-ft epoch {epoch + 1}", disable=not progress):
            idx = order[start:start + batch_size]
            loss = lsr_loss(batch_sims(idx), lm_scores[idx], tau)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
    after = {"train": evaluate(train_q), "eval": evaluate(eval_q)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder.eval()
    encoder.save(str(out / QUERY_ENCODER))
    (out / DUAL).write_text(json.dumps({"passage_embedder": MINILM, "query_encoder": QUERY_ENCODER, "tau": tau}))
    metrics = {"trainer": "radit-retriever", "questions": {"train": len(train_q), "eval": len(eval_q)}, "k": k,
               "tau": tau, "epochs": epochs, "before": before, "after": after, "steps": len(history),
               "log": history, "lm": str(directory),
               "candidates": "top-k of the original query encoder, retrieved once (the passage index is frozen)"}
    write_metrics(out, metrics)
    return metrics


# -- evaluation --------------------------------------------------------------------------------------
def answer_line(text: str) -> str:
    """The first line of an answer without punctuation or case: what exact match compares."""
    return re.sub(r"[^\w\s]", "", text.strip().split("\n")[0]).strip().lower()


def exact_match(model_path: str | Path | None, questions: list[QA], retriever: Retriever | None = None,
                max_new_tokens: int = 6, batch_size: int = 8) -> dict[str, float]:
    """Greedy answers, with the top-1 retrieved chunk as background or without retrieval: the share
    whose first line is exactly the answer, and the share that contain it."""
    directory = model_dir(model_path)
    tokenizer, model = load_tokenizer(directory), load_causal_lm(directory).eval()
    tokenizer.padding_side = "left"
    prompts = [format_prompt(background_prompt([retriever.search(q.question, 1)[0].text], q.question)
                             if retriever else q.question) for q in questions]
    answers = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    exact = [answer_line(a) == answer_line(q.answer) for a, q in zip(answers, questions)]
    contains = [q.answer in a for a, q in zip(answers, questions)]
    return {"exact_match": float(np.mean(exact)), "exact_match_ci95": mean_ci95([float(x) for x in exact]),
            "contains": float(np.mean(contains)), "n": len(questions),
            "examples": [{"question": q.question, "answer": q.answer, "output": a}
                         for q, a in zip(questions[:5], answers[:5])]}


def ranking_metrics(ranked: list[list[str]], relevant: list[str], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, Any]:
    """recall@k (one relevant passage per query) and nDCG@10 (1 / log2(rank + 1) at its rank), with
    95% bootstrap intervals over queries for recall@1 and nDCG@10, and the number of queries."""
    ranks = [r.index(rel) + 1 if rel in r else math.inf for r, rel in zip(ranked, relevant)]
    metrics: dict[str, Any] = {f"recall@{k}": float(np.mean([rank <= k for rank in ranks])) for k in ks}
    gains = [1 / math.log2(rank + 1) if rank <= 10 else 0.0 for rank in ranks]
    metrics["ndcg@10"] = float(np.mean(gains))
    metrics["recall@1_ci95"] = mean_ci95([float(rank <= 1) for rank in ranks])
    metrics["ndcg@10_ci95"] = mean_ci95(gains)
    metrics["queries"] = len(ranks)
    return metrics
