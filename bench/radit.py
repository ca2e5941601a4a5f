"""Retrieval and RA-DIT evaluation on the vendored Wikipedia paragraphs, on the default model.

    python bench/radit.py                      # about 15 minutes on 2 CPU cores
    python bench/radit.py --llara-steps 200    # a longer LLaRA run

Retrieval: the paragraphs of the first `--articles` articles form the corpus; each query is a
sentence of a paragraph, relevant is that paragraph ("source") or the one after it ("next"); cloze
questions (a year blanked out of a sentence) have their source paragraph as relevant too. Embedders:
MiniLM, the default model as an LLM embedder before and after LLaRA (LoRA, trained on paragraph
pairs of the *other* articles), and MiniLM with an LSR-tuned query encoder (R-ft on half of the cloze
questions, scored by the default model, evaluated on the other half).  95% bootstrap intervals over
queries and questions. QA: exact match on the other half of the cloze questions,
without and with the top-1 retrieved paragraph, before and after LM-ft (LoRA). Prints tables, then
one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.corpus import load_documents
from retrieval.embedders import SentenceEmbedder
from retrieval.loading import load_embedder
from retrieval.index import VectorIndex
from retrieval.llm_embedder import LLMEmbedder
from retrieval.retriever import Retriever, build_retriever
from steer.lm import default_model_path
from train.common import TrainOptions
from train.llara import PassagePair, train_llara
from train.radit import (
    cloze_questions,
    exact_match,
    ranking_metrics,
    train_radit_lm,
    train_radit_retriever,
)

WIKI = Path(__file__).resolve().parents[1] / "examples/data/wikipedia_passages.jsonl.gz"


def sentence_queries(documents, target: str) -> tuple[list[str], list[str]]:
    """A sentence of each paragraph as the query; relevant: the paragraph itself or the next one."""
    queries, relevant = [], []
    for d, following in zip(documents, documents[1:] + [None]):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", d.text) if len(s.split()) >= 6]
        if not sentences:
            continue
        if target == "source":
            queries.append(sentences[min(1, len(sentences) - 1)])
            relevant.append(d.id)
        elif following is not None and following.title == d.title:
            queries.append(sentences[-1])
            relevant.append(following.id)
    return queries, relevant


def evaluate(embedder, documents, query_sets) -> dict[str, dict[str, float]]:
    vectors = embedder.embed_passages([d.text for d in documents], progress=True)
    index = VectorIndex.build(vectors, kind="flat")
    results = {}
    for name, (queries, relevant) in query_sets.items():
        _, rows = index.search(embedder.embed_queries(queries), 10)
        results[name] = ranking_metrics([[documents[r].id for r in row] for row in rows], relevant)
    return results


def fmt(interval) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--articles", type=int, default=5, help="articles whose paragraphs form the corpus")
    parser.add_argument("--llara-steps", type=int, default=60)
    parser.add_argument("--llara-pairs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="radit-bench-"))

    documents = load_documents(WIKI)
    titles = list(dict.fromkeys(d.title for d in documents))
    corpus_titles = set(titles[:args.articles])
    corpus = [d for d in documents if d.title in corpus_titles]
    others = [d for d in documents if d.title not in corpus_titles]
    corpus_file = work / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in corpus))
    questions = cloze_questions(corpus, seed=args.seed)
    train_q, test_q = questions[::2], questions[1::2]
    query_sets = {"sentence->source": sentence_queries(corpus, "source"),
                  "sentence->next": sentence_queries(corpus, "next"),
                  "cloze->source": ([q.question for q in test_q], [q.source for q in test_q])}

    minilm = SentenceEmbedder()
    index_dir = work / "index"
    build_retriever(corpus_file, index_dir, embedder=minilm, progress=False)
    retrieval = {"MiniLM": evaluate(minilm, corpus, query_sets)}
    retrieval["LLM (base)"] = evaluate(LLMEmbedder.load(default_model_path()), corpus, query_sets)

    pairs = [PassagePair(a.text, b.text, a.title) for a, b in itertools.pairwise(others) if a.title == b.title]
    llara = train_llara(pairs[:args.llara_pairs], TrainOptions(
        out=str(work / "llara"), max_steps=args.llara_steps, batch_size=4, learning_rate=1e-4, max_length=96,
        lora=True, eval_fraction=0.05, save_steps=10_000, seed=args.seed))
    retrieval["LLM (LLaRA)"] = evaluate(LLMEmbedder.load(llara["model"]), corpus, query_sets)

    rft = train_radit_retriever(train_q, index_dir, work / "rft", k=4, epochs=3, eval_questions=test_q, seed=args.seed)
    retrieval["MiniLM + LSR query encoder"] = evaluate(load_embedder(str(work / "rft")), corpus, query_sets)

    retriever = Retriever.load(index_dir, embedder=minilm)
    qa = {"base": {"no retrieval": exact_match(None, test_q), "top-1 retrieved": exact_match(None, test_q, retriever)}}
    lmft = train_radit_lm(train_q, index_dir, TrainOptions(
        out=str(work / "lmft"), epochs=2, batch_size=4, learning_rate=1e-4, max_length=384, lora=True,
        eval_fraction=0.1, save_steps=10_000, seed=args.seed), k=2)
    qa["LM-ft"] = {"no retrieval": exact_match(lmft["model"], test_q),
                   "top-1 retrieved": exact_match(lmft["model"], test_q, retriever)}

    print(f"\nRetrieval over {len(corpus)} paragraphs of {args.articles} articles "
          f"(queries: {', '.join(f'{k} {len(v[0])}' for k, v in query_sets.items())})")
    print(f"{'embedder':<28}" + "".join(f"{k + ' R@1/R@10/nDCG@10':>40}" for k in query_sets))
    for name, by_set in retrieval.items():
        cells = "".join(f"{m['recall@1']:>20.3f}/{m['recall@10']:.3f}/{m['ndcg@10']:.3f}" for m in by_set.values())
        print(f"{name:<28}{cells}")
    print("95% intervals of R@1 over queries: " + "; ".join(
        f"{name} {k}: {fmt(m['recall@1_ci95'])}" for name, by_set in retrieval.items() for k, m in by_set.items()))
    print(f"LLaRA: {llara['train']['steps']} steps on {min(len(pairs), args.llara_pairs)} pairs, eval loss "
          f"{llara['eval_before']['eval_loss']:.3f} -> {llara['eval']['eval_loss']:.3f}")
    held = rft["questions"]
    print(f"LSR on {held['eval']} held-out questions (trained on {held['train']}): loss "
          f"{rft['before']['eval']['lsr_loss']:.3f} -> {rft['after']['eval']['lsr_loss']:.3f}; the LM's best chunk "
          f"ranked first {rft['before']['eval']['lm_best_ranked_first']:.2f} "
          f"{fmt(rft['before']['eval']['lm_best_ranked_first_ci95'])} -> "
          f"{rft['after']['eval']['lm_best_ranked_first']:.2f} {fmt(rft['after']['eval']['lm_best_ranked_first_ci95'])}")
    print(f"\nQA exact match on {len(test_q)} held-out cloze questions (LM-ft on {len(train_q)}, 2 chunks each)")
    print(f"{'model':<8}{'no retrieval [95% CI]':<23}{'top-1 retrieved [95% CI]':<23}")
    for name, row in qa.items():
        print(f"{name:<8}" + "".join(f"{row[k]['exact_match']:>8.3f} {fmt(row[k]['exact_match_ci95']):<14}"
                                     for k in ("no retrieval", "top-1 retrieved")))
    minutes = (time.perf_counter() - started) / 60
    print(f"({minutes:.1f} min)")
    print(json.dumps({"retrieval": retrieval, "llara": {k: llara[k] for k in ("eval_before", "eval")},
                      "lsr": {k: rft[k] for k in ("questions", "before", "after")},
                      "qa": {m: {k: {x: v[x] for x in ("exact_match", "exact_match_ci95", "contains", "n")}
                                 for k, v in row.items()}
                             for m, row in qa.items()},
                      "minutes": round(minutes, 1)}))


if __name__ == "__main__":
    main()
