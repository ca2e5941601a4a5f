"""The retrieval package: faiss indexes against brute force, self-kNN, corpora, retrievers, `steer index`."""

import json

import numpy as np
import pytest

from retrieval.corpus import (
    cached_embeddings,
    embed_documents,
    load_documents,
    load_embeddings,
)
from retrieval.embedders import RetrievalError, normalise
from retrieval.index import AUTO_IVF_FROM, VectorIndex, choose_kind, self_knn
from retrieval.retriever import Retriever
from steer.cli import main
from steer.jsonl import DataError

pytestmark = pytest.mark.slow  # the MiniLM embedder and faiss indexes: seconds each, so not in the fast subset


def clustered(n=4000, dim=32, clusters=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return normalise(centres[rng.integers(0, clusters, n)] + 0.8 * rng.standard_normal((n, dim)))


def brute_force(vectors, queries, k):
    scores = queries @ vectors.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


def recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())])


def test_flat_index_is_exact():
    vectors = clustered(500)
    scores, rows = VectorIndex.build(vectors, kind="flat").search(vectors[:20], 7)
    want_scores, want_rows = brute_force(vectors, vectors[:20], 7)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert recall(rows, want_rows) == 1.0


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_true_neighbours_and_survive_save_load(kind, tmp_path):
    vectors = clustered(4000)
    index = VectorIndex.build(vectors, kind=kind, embedder="test")
    _, truth = brute_force(vectors, vectors[:200], 10)
    _, rows = index.search(vectors[:200], 10)
    assert recall(rows, truth) >= 0.9
    loaded = VectorIndex.load(index.save(tmp_path / kind))
    assert loaded.meta == index.meta and len(loaded) == 4000
    np.testing.assert_array_equal(loaded.search(vectors[:50], 10)[1], index.search(vectors[:50], 10)[1])


def test_auto_kind_switches_to_ivf_at_scale_and_overrides_win():
    assert choose_kind(AUTO_IVF_FROM - 1) == "flat"
    assert choose_kind(AUTO_IVF_FROM) == "ivf"
    assert choose_kind(10, "hnsw") == "hnsw"
    with pytest.raises(RetrievalError, match="unknown index kind 'annoy'"):
        choose_kind(10, "annoy")


def test_index_errors_are_clear():
    index = VectorIndex.build(clustered(50, dim=8), kind="flat")
    with pytest.raises(RetrievalError, match="dimension 16 but the index has dimension 8"):
        index.search(np.ones((1, 16), np.float32), 3)
    with pytest.raises(RetrievalError, match="empty collection"):
        VectorIndex.build(np.zeros((0, 8), np.float32))
    assert index.search(clustered(1, dim=8), 500)[1].shape == (1, 50)  # k beyond the collection: all of it


def test_self_knn_matches_brute_force_without_self():
    vectors = clustered(300, dim=16)
    sims, rows = self_knn(vectors, 5, batch=64)
    scores, order = brute_force(vectors, vectors, 6)
    assert (rows != np.arange(300)[:, None]).all()
    assert recall(rows, order[:, 1:]) > 0.99
    np.testing.assert_allclose(sims, scores[:, 1:], atol=1e-5)


def test_self_knn_drops_self_among_exact_duplicates_and_pads_small_corpora():
    vectors = normalise(np.array([[1.0, 0], [1.0, 0], [0, 1.0]]))
    sims, rows = self_knn(vectors, 4)
    assert rows[0].tolist() == [1, 2, -1, -1] and rows[1].tolist() == [0, 2, -1, -1]
    assert np.isneginf(sims[0, 2:]).all()
    _, alone = self_knn(vectors[:1], 3)
    assert alone.tolist() == [[-1, -1, -1]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("rows", "message"), [
    ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], r":2: duplicate id 'a' \(first on line 1\)"),
    ([{"id": "a", "text": "  "}], r":1: field 'text' is empty"),
    ([{"id": "a"}], r":1: field 'text' must be a string \(missing\)"),
    ([{"id": "a", "text": 3}], r":1: field 'text' must be a string \(a int\)"),
])
def test_bad_documents_name_their_line(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_documents(write_jsonl(tmp_path / "docs.jsonl", rows))


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="has no rows"):
        load_documents(tmp_path / "empty.jsonl")


def test_embeddings_are_stored_memory_mapped_with_ids(minilm, tmp_path):
    texts = ["a cat sat on the mat", "stock markets fell sharply", "the kitten slept on a rug"]
    vectors = embed_documents(minilm, texts, tmp_path, ids=["x", "y", "z"], chunk=2, progress=False)
    stored, ids = load_embeddings(tmp_path)
    assert isinstance(stored, np.memmap) and ids == ["x", "y", "z"] and stored.shape == (3, 384)
    np.testing.assert_allclose(np.asarray(vectors), minilm.embed_passages(texts), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    assert stored[0] @ stored[2] > stored[0] @ stored[1]  # cats are closer to kittens than to stocks
    # reused only for the same embedder and the same documents in the same order
    np.testing.assert_array_equal(cached_embeddings(tmp_path, minilm.name, ["x", "y", "z"]), stored)
    assert cached_embeddings(tmp_path, "another-embedder", ["x", "y", "z"]) is None
    assert cached_embeddings(tmp_path, minilm.name, ["x", "z", "y"]) is None


def test_a_passage_is_found_from_its_own_first_sentence(wiki_index, wiki_docs, minilm):
    retriever = Retriever.load(wiki_index, embedder=minilm)
    documents = load_documents(wiki_docs)
    queries = [d.text.split(". ")[0] for d in documents]
    hits = retriever.search_many(queries, k=5)
    top1 = np.mean([h[0].id == d.id for h, d in zip(hits, documents)])
    top5 = np.mean([d.id in {x.id for x in h} for h, d in zip(hits, documents)])
    assert top1 >= 0.7 and top5 >= 0.9, (top1, top5)
    assert all(h[0].score >= h[-1].score for h in hits)


class WordHashEmbedder:
    """A deterministic bag-of-words embedder: a second, different embedding space."""

    name, dim = "word-hash", 384

    def embed_passages(self, texts, batch_size=64, progress=False):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, sum(map(ord, word)) % self.dim] += 1
        return normalise(out)

    embed_queries = embed_passages


def test_an_index_refuses_an_embedder_it_was_not_built_with(wiki_index):
    with pytest.raises(RetrievalError, match="built with the embedder 'all-MiniLM-L6-v2', not 'word-hash'"):
        Retriever.load(wiki_index, embedder=WordHashEmbedder())
    small = WordHashEmbedder()
    small.name, small.dim = "all-MiniLM-L6-v2", 128
    with pytest.raises(RetrievalError, match="gives 128-d vectors but the index holds 384-d"):
        Retriever.load(wiki_index, embedder=small)


def test_index_cli_builds_and_searches(wiki_docs, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "build", "--docs", str(wiki_docs), "--out", str(out), "--kind", "hnsw",
                 "--no-progress"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built == {"out": str(out), "documents": 48, "kind": "hnsw", "dim": 384, "embedder": "all-MiniLM-L6-v2"}
    assert main(["index", "search", str(out), "an anarchist political philosophy", "-k", "3", "--json"]) == 0
    hits = [json.loads(line, parse_constant=_refuse) for line in capsys.readouterr().out.splitlines()]  # strict
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["title"] == "Anarchism"
    # a cut-off index file, then one from elsewhere: one-line user errors (exit 2), never a faiss traceback
    index_file = out / "index.faiss"
    whole = index_file.read_bytes()
    index_file.write_bytes(whole[:len(whole) // 2])
    assert main(["index", "search", str(out), "anarchism"]) == 2
    err = capsys.readouterr().err.strip()
    assert "index.faiss: not a readable faiss index (corrupt or cut off" in err and len(err.splitlines()) == 1
    index_file.write_bytes(b"not an index at all")
    assert main(["index", "search", str(out), "anarchism"]) == 2
    assert "not a readable faiss index" in capsys.readouterr().err


def test_index_cli_user_errors_exit_2(tmp_path, capsys):
    assert main(["index", "search", str(tmp_path), "query"]) == 2
    assert "not an index directory" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": 1, "text": "x"}, {"id": 1, "text": "y"}])
    assert main(["index", "build", "--docs", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: duplicate id '1'" in capsys.readouterr().err


def _refuse(name):
    raise ValueError(f"not JSON: {name}")


def test_embedding_and_search_split_over_workers_give_the_single_machine_result(wiki_docs, minilm, tmp_path):
    """How a corpus too large for one machine is handled, on small shards: each worker embeds its part
    (`embed_documents` to its own folder), each part gets its own faiss index, and faiss's own
    IndexShards searches them as one, with the parts' ids offset so they stay global."""
    import faiss

    from retrieval.corpus import embed_documents, load_documents, load_embeddings

    documents = load_documents(wiki_docs)
    parts = [documents[:20], documents[20:]]
    for k, part in enumerate(parts):  # one worker each
        embed_documents(minilm, [d.text for d in part], tmp_path / f"part{k}", ids=[d.id for d in part],
                        progress=False)
    loaded = [load_embeddings(tmp_path / f"part{k}") for k in range(2)]
    whole = embed_documents(minilm, [d.text for d in documents], progress=False)
    np.testing.assert_allclose(np.concatenate([v for v, _ in loaded]), whole, atol=1e-5)

    shards = faiss.IndexShards(whole.shape[1], True, True)  # threaded, successive ids
    for vectors, _ in loaded:
        shard = faiss.IndexFlatIP(whole.shape[1])
        shard.add(np.ascontiguousarray(vectors))
        shards.add_shard(shard)
    queries = minilm.embed_queries(["an anarchist political philosophy", "the albedo of a surface"])
    _, sharded = shards.search(queries, 5)
    _, single = VectorIndex.build(whole, kind="flat").search(queries, 5)
    assert (sharded == single).all()
