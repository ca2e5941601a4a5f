"""LLaRA: the bag-of-words loss against a direct computation, slot pooling, pair data, training on a
tiny model, the LLM embedder built from the result, and a LoRA step on the default model."""

import json

import numpy as np
import pytest
import torch

from retrieval.embedders import RetrievalError
from retrieval.llm_embedder import LLMEmbedder, default_format, encode, pad, slot_embeddings
from steer.cli import main
from steer.jsonl import DataError
from train.common import TrainOptions, load_causal_lm, load_tokenizer
from train.llara import bag_of_words_loss, load_passage_pairs, train_llara

pytestmark = pytest.mark.slow  # training steps: seconds each, so not in the fast subset


def test_bag_of_words_loss_equals_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    bags = [[1, 2, 2, 7], [49], [0, 3, 5, 5, 5, 11]]
    direct = 0.0
    for row, bag in zip(logits, bags):
        log_z = torch.logsumexp(row, 0)
        tokens = sorted(set(bag))
        direct += -sum((row[t] - log_z).item() for t in tokens) / len(tokens)
    assert bag_of_words_loss(logits, bags).item() == pytest.approx(direct / 3, abs=1e-6)


def test_slot_embeddings_pool_the_last_slots_whatever_the_padding(tiny_text_dir):
    tokenizer = load_tokenizer(tiny_text_dir)
    model = load_causal_lm(tiny_text_dir).eval()
    fmt, _ = default_format(tokenizer)
    model.resize_token_embeddings(len(tokenizer))
    texts = ["a short one", "a rather longer passage of text here"]
    sequences = encode(tokenizer, texts, fmt.ebae_instruction, fmt.ebae_slots, 64)
    ids, mask = pad(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        batched = slot_embeddings(model, ids, mask)
        for i, seq in enumerate(sequences):
            hidden = model.get_decoder()(input_ids=torch.tensor([seq])).last_hidden_state[0]
            torch.testing.assert_close(batched[i], hidden[-8:].mean(0), atol=1e-5, rtol=1e-5)
    slot_ids = tokenizer.convert_tokens_to_ids(fmt.ebae_slots)
    assert all(seq[-8:] == slot_ids for seq in sequences)


def test_gemma_slots_reuse_reserved_tokens():
    from train.common import model_dir

    tokenizer = load_tokenizer(model_dir(None))
    size = len(tokenizer)
    fmt, added = default_format(tokenizer)
    assert not added and len(tokenizer) == size
    assert fmt.ebae_slots[0] == "<unused0>" and len(set(fmt.ebae_slots + fmt.ebar_slots)) == 16


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_passage_pairs_from_consecutive_paragraphs_and_bad_rows(tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", [
        {"id": "1-0", "text": "A0"}, {"id": "1-1", "text": "A1"}, {"id": "1-3", "text": "A3"},
        {"id": "2-0", "text": "B0"}, {"id": "2-1", "text": "B1"}])
    assert [(p.passage, p.next) for p in load_passage_pairs(docs)] == [("A0", "A1"), ("B0", "B1")]
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'next' must be a non-empty string"):
        load_passage_pairs(write_jsonl(tmp_path / "pairs.jsonl", [{"passage": "a", "next": "b"},
                                                                 {"passage": "a", "next": " "}]))
    with pytest.raises(DataError, match=r"ids.jsonl:1: id 'x' is not 'article-paragraph'"):
        load_passage_pairs(write_jsonl(tmp_path / "ids.jsonl", [{"id": "x", "text": "a"}]))
    with pytest.raises(DataError, match="no passage / next-passage pairs"):
        load_passage_pairs(write_jsonl(tmp_path / "one.jsonl", [{"id": "1-0", "text": "a"}]))


def test_pairs_know_their_article_and_eval_articles_are_never_trained_on(tiny_text_dir, tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"{a}-{p}", "text": f"article {a} paragraph {p}"}
                                                for a in range(6) for p in range(4)])
    pairs = load_passage_pairs(docs)
    assert [p.article for p in pairs[:4]] == ["0", "0", "0", "1"]
    # rows without an article: pairs that share a text belong together (a chain a->b->c, and x->y)
    loose = load_passage_pairs(write_jsonl(tmp_path / "loose.jsonl", [
        {"passage": "a", "next": "b"}, {"passage": "x", "next": "y"}, {"passage": "b", "next": "c"}]))
    assert loose[0].article == loose[2].article != loose[1].article
    options = TrainOptions(model=str(tiny_text_dir), out=str(tmp_path / "run"), max_steps=1, batch_size=2,
                           max_length=16, eval_fraction=0.3, save_steps=100, progress=False)
    metrics = train_llara(docs, options)
    # 6 articles x 3 pairs: a 30% share is 5.4 pairs, so two whole articles (6 pairs) are held out
    assert metrics["pairs"] == {"train": 12, "eval": 6} and metrics["articles"] == {"train": 4, "eval": 2}


def test_training_lowers_the_loss_and_gives_an_embedder(tiny_text_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"passage": f"cats and kittens {i}", "next": f"dogs bark {i}"} for i in range(12)])
    options = TrainOptions(model=str(tiny_text_dir), out=str(tmp_path / "run"), max_steps=12, batch_size=4,
                           learning_rate=5e-3, max_length=32, eval_fraction=0.25, save_steps=100, progress=False)
    metrics = train_llara(pairs, options)
    assert metrics["eval"]["eval_loss"] < metrics["eval_before"]["eval_loss"]
    embedder = LLMEmbedder.load(tmp_path / "run" / "model")
    assert embedder.fmt.ebae_slots[0] == "<llara_0>"  # the tiny tokenizer had no reserved tokens
    passages = embedder.embed_passages(["cats and kittens", "dogs bark"])
    queries = embedder.embed_queries(["cats and kittens"])
    assert passages.shape == (2, embedder.dim) and np.allclose(np.linalg.norm(passages, axis=1), 1, atol=1e-5)
    assert not np.allclose(passages[0], queries[0])  # different prompts for queries and passages


def test_a_plain_model_without_reserved_tokens_cannot_embed(tiny_text_dir):
    with pytest.raises(RetrievalError, match="no reserved tokens"):
        LLMEmbedder.load(tiny_text_dir)


def test_llara_lora_step_on_the_default_model(wiki_docs, tmp_path, capsys):
    rows = [json.loads(line) for line in wiki_docs.read_text().splitlines()]
    articles = sorted({r["id"].rpartition("-")[0] for r in rows})[:2]
    docs = write_jsonl(tmp_path / "docs.jsonl", [r for a in articles for r in rows
                                                 if r["id"] in (f"{a}-0", f"{a}-1", f"{a}-2")])
    assert main(["train", "llara", "--data", str(docs), "--out", str(tmp_path / "run"), "--lora",
                 "--max-steps", "2", "--batch-size", "2", "--max-length", "48",
                 "--eval-fraction", "0.34", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and np.isfinite(summary["eval_loss"])  # one whole article held out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["articles"] == {"train": 1, "eval": 1} and metrics["pairs"] == {"train": 2, "eval": 2}
    embedder = LLMEmbedder.load(tmp_path / "run" / "model")
    assert embedder.dim == 640 and embedder.fmt.ebar_slots[0] == "<unused8>"
    vectors = embedder.embed_passages(["Anarchism is a political philosophy.", "The sun is a star."])
    assert vectors.shape == (2, 640)
