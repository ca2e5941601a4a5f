"""RA-DIT: the LSR loss against a direct computation, R-ft changing only the query encoder, LM-ft,
parallel retrieval-augmented likelihood, cloze questions and ranking metrics."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from retrieval.corpus import load_documents
from retrieval.embedders import RetrievalError
from retrieval.loading import DualEmbedder, load_embedder
from retrieval.retriever import Retriever, background_prompt
from steer.cli import main
from steer.jsonl import DataError
from steer.template import format_prompt
from train.common import load_causal_lm, load_tokenizer
from train.radit import (
    QA,
    cloze_questions,
    load_qa,
    lsr_loss,
    parallel_log_likelihood,
    ranking_metrics,
    train_radit_retriever,
    write_qa,
)

pytestmark = pytest.mark.slow  # training steps and embedding models: seconds each, so not in the fast subset


def test_lsr_loss_equals_a_direct_computation():
    retriever = np.array([[0.9, 0.5, 0.1, 0.3], [0.2, 0.8, 0.75, 0.1]])
    lm = np.array([[-1.2, -0.4, -2.0, -0.9], [-3.0, -0.2, -0.25, -1.0]])
    tau, tau_r = 0.5, 0.1
    direct = 0.0
    for r, s in zip(retriever, lm):
        p_r = np.exp(r / tau_r) / np.exp(r / tau_r).sum()
        p_lsr = np.exp(s / tau) / np.exp(s / tau).sum()
        direct += float(np.sum(p_r * np.log(p_r / p_lsr)))
    got = lsr_loss(torch.tensor(retriever), torch.tensor(lm), tau=tau, retriever_tau=tau_r).item()
    assert got == pytest.approx(direct / 2, abs=1e-6)
    same = torch.tensor([[1.0, 2.0]])
    assert lsr_loss(same, same, tau=1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_ranking_metrics_by_hand():
    ranked = [["a", "b", "c"], ["x", "y", "z"], ["p", "q"]]
    metrics = ranking_metrics(ranked, ["a", "z", "missing"], ks=(1, 3))
    assert metrics["recall@1"] == pytest.approx(1 / 3) and metrics["recall@3"] == pytest.approx(2 / 3)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 0) / 3)
    assert metrics["queries"] == 3
    low, high = metrics["recall@1_ci95"]
    assert 0 <= low < 1 / 3 < high <= 1  # resampled over the three queries


def test_cloze_questions_blank_a_year_of_their_source(wiki_docs):
    documents = {d.id: d for d in load_documents(wiki_docs)}
    questions = cloze_questions(list(documents.values()))
    assert len(questions) >= 5
    for q in questions:
        assert "____" in q.question and q.answer not in q.question
        assert q.answer in documents[q.source].text


def test_bad_qa_rows_name_their_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "q", "answer": ""}\n')
    with pytest.raises(DataError, match=r"qa.jsonl:2: field 'answer' must be a non-empty string"):
        load_qa(path)


def files_digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_rft_changes_only_the_query_encoder(wiki_index, wiki_docs, tiny_text_dir, minilm, tmp_path):
    questions = cloze_questions(load_documents(wiki_docs))
    index_before, lm_before = files_digest(wiki_index), files_digest(tiny_text_dir)
    metrics = train_radit_retriever(questions, wiki_index, tmp_path / "rft", lm=str(tiny_text_dir), k=3,
                                    epochs=3, batch_size=4, learning_rate=1e-4, progress=False)
    assert files_digest(wiki_index) == index_before and files_digest(tiny_text_dir) == lm_before
    before, after, held = metrics["before"], metrics["after"], metrics["questions"]
    assert after["train"]["lsr_loss"] < before["train"]["lsr_loss"]
    assert held["eval"] == round(0.2 * len(questions)) and held["train"] + held["eval"] == len(questions)
    assert set(after["eval"]) == {"lsr_loss", "lm_best_ranked_first", "lm_best_ranked_first_ci95"}
    low, high = after["train"]["lm_best_ranked_first_ci95"]  # (the held-out few may be one question: None)
    assert held["train"] >= 2 and low <= after["train"]["lm_best_ranked_first"] <= high
    # held-out questions given: every question of the data trains, the given ones are evaluated
    given = train_radit_retriever(questions[:-3], wiki_index, tmp_path / "rft2", lm=str(tiny_text_dir), k=3,
                                  epochs=1, batch_size=4, eval_questions=questions[-3:], progress=False)
    assert given["questions"] == {"train": len(questions) - 3, "eval": 3}
    dual = load_embedder(str(tmp_path / "rft"))
    assert isinstance(dual, DualEmbedder) and dual.name == minilm.name
    texts = ["Anarchism is a political philosophy.", questions[0].question]
    np.testing.assert_allclose(dual.embed_passages(texts), minilm.embed_passages(texts), atol=1e-6)
    assert not np.allclose(dual.embed_queries(texts), minilm.embed_queries(texts), atol=1e-4)
    hits = Retriever.load(wiki_index, embedder=dual).search(questions[0].question, 3)
    assert len(hits) == 3


def test_rft_refuses_an_index_of_another_embedder(wiki_index, tmp_path):
    index = tmp_path / "other"
    index.mkdir()
    for f in wiki_index.iterdir():
        (index / f.name).write_bytes(f.read_bytes())
    meta = json.loads((index / "index.json").read_text())
    (index / "index.json").write_text(json.dumps({**meta, "embedder": "some-other-model"}))
    with pytest.raises(RetrievalError, match="unknown embedder 'some-other-model'"):
        train_radit_retriever([QA("q?", "1900")], index, tmp_path / "o", progress=False)


def test_parallel_likelihood_is_the_mixture_of_per_chunk_likelihoods(tiny_text_dir):
    tokenizer, model = load_tokenizer(tiny_text_dir), load_causal_lm(tiny_text_dir).eval()
    chunks, probs = ["first chunk", "a second, longer chunk"], np.array([0.25, 0.75])
    question, answer = "what?", "1900"
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    direct = []
    for chunk in chunks:  # one plain forward pass per chunk
        ids = tokenizer(format_prompt(background_prompt([chunk], question)))["input_ids"] + answer_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        start = len(ids) - len(answer_ids)
        direct.append(sum(logprobs[start - 1 + i, t].item() for i, t in enumerate(answer_ids)))
    want = math.log(sum(p * math.exp(d) for p, d in zip(probs, direct)))
    assert parallel_log_likelihood(model, tokenizer, chunks, probs, question, answer) == pytest.approx(want, abs=1e-4)


def test_radit_lm_cli_trains_on_retrieved_prompts(wiki_index, wiki_docs, tiny_long_dir, tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    write_qa(qa, cloze_questions(load_documents(wiki_docs))[:6])
    assert main(["train", "radit-lm", "--data", str(qa), "--index", str(wiki_index), "--model", str(tiny_long_dir),
                 "--out", str(tmp_path / "lmft"), "--max-steps", "2", "--k", "2", "--max-length", "2048",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2
    metrics = json.loads((tmp_path / "lmft" / "metrics.json").read_text())
    assert metrics["questions"] == 6 and metrics["examples"]["train"] + metrics["examples"]["eval"] == 12
    # 10% of 12 examples is one, but a question's two chunks are held out together (a split by example
    # would train on the other chunk of the eval question)
    assert metrics["examples"]["eval"] == 2


def test_exact_match_reads_the_first_line_of_greedy_answers(tiny_long_dir, wiki_index, minilm):
    from train.radit import answer_line, exact_match

    assert answer_line(" 1840.\nmore text") == "1840" and answer_line("In 1840") != "1840"
    questions = [QA("Which year fills the blank? It began in ____.", "1840")]
    result = exact_match(str(tiny_long_dir), questions, max_new_tokens=3)
    retrieved = exact_match(str(tiny_long_dir), questions, Retriever.load(wiki_index, embedder=minilm), 3)
    for r in (result, retrieved):
        assert r["n"] == 1 and r["exact_match"] in (0.0, 1.0) and len(r["examples"]) == 1
        assert r["exact_match"] == float(answer_line(r["examples"][0]["output"]) == "1840")


def test_a_query_encoder_of_another_dimension_is_refused(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer, models

    narrow = SentenceTransformer(modules=[minilm.model[0], minilm.model[1], models.Dense(384, 128)], device="cpu")
    narrow.save(str(tmp_path / "query_encoder"))
    (tmp_path / "dual.json").write_text(json.dumps({"passage_embedder": "all-MiniLM-L6-v2",
                                                    "query_encoder": "query_encoder"}))
    with pytest.raises(RetrievalError, match="query encoder gives 128-d vectors but passages are 384-d"):
        load_embedder(str(tmp_path))


def test_both_radit_stages_on_the_default_model(wiki_index, wiki_docs, tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    write_qa(qa, cloze_questions(load_documents(wiki_docs))[:4])
    assert main(["train", "radit-retriever", "--data", str(qa), "--index", str(wiki_index), "--out",
                 str(tmp_path / "lsr"), "--k", "2", "--epochs", "1", "--no-progress"]) == 0
    lsr = json.loads(capsys.readouterr().out)
    assert lsr["questions"] == {"train": 3, "eval": 1}  # one question held out, reported on its own
    assert np.isfinite(lsr["after"]["eval"]["lsr_loss"]) and lsr["after"]["eval"]["lm_best_ranked_first"] in (0, 1)
    assert isinstance(load_embedder(str(tmp_path / "lsr")), DualEmbedder)
    assert main(["train", "radit-lm", "--data", str(qa), "--index", str(wiki_index), "--out", str(tmp_path / "lmft"),
                 "--lora", "--max-steps", "1", "--batch-size", "1", "--k", "1", "--max-length", "384",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 1
    assert (tmp_path / "lmft" / "model" / "model.safetensors").is_file()
    assert main(["train", "radit-lm", "--data", str(tmp_path / "missing.jsonl"), "--index", str(wiki_index),
                 "--out", str(tmp_path / "x")]) == 2
    assert "missing.jsonl: no such data file" in capsys.readouterr().err
