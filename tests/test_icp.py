"""In-Context Pretraining ordering: dedup, graph, traversal (checked against a slow direct
simulation of the paper's rule), packing, and the whole pipeline on real Wikipedia paragraphs."""

import itertools
import json

import numpy as np
import pytest

from retrieval.embedders import normalise
from retrieval.index import self_knn
from steer.cli import main
from steer.jsonl import DataError
from train.common import load_tokenizer, model_dir
from train.icp import (
    adjacent_similarity,
    greedy_order,
    knn_graph,
    near_duplicates,
    order_corpus,
    order_embeddings,
    pack,
    reference_order,
    window_spans,
)

pytestmark = pytest.mark.slow  # embedding models and corpus orderings: seconds each, so not in the fast subset


def clusters(sizes, dim=24, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    return normalise(centres[labels] + spread * rng.standard_normal((len(labels), dim))), labels


def neighbours(graph):
    return [graph.indices[graph.indptr[i]:graph.indptr[i + 1]].tolist() for i in range(len(graph.indptr) - 1)]


def test_graph_is_the_undirected_knn_graph_sorted_by_similarity():
    vectors, _ = clusters([30, 30, 30])
    sims, rows = self_knn(vectors, 4)
    graph = knn_graph(sims, rows)
    expected = [set() for _ in range(len(rows))]
    for i, row in enumerate(rows):
        for j in row:
            expected[i].add(int(j))
            expected[int(j)].add(i)
    lists = neighbours(graph)
    assert [set(x) for x in lists] == expected
    assert all(len(x) == len(set(x)) for x in lists)
    for i, row in enumerate(lists):
        similarity = vectors[row] @ vectors[i]
        assert np.all(np.diff(similarity) <= 1e-6)
    np.testing.assert_array_equal(graph.degree, [len(e) for e in expected])


def test_traversal_follows_the_papers_rule_step_by_step():
    """Replays the order against a direct simulation: each walk starts at an unvisited document of
    minimum degree among unvisited documents, and each other step goes to the most similar
    unvisited neighbour of the previous document."""
    vectors, _ = clusters([40, 25, 10, 3, 1], spread=0.8, seed=3)
    sims, rows = self_knn(vectors, 3)
    graph = knn_graph(sims, rows)
    adjacency = [set(x) for x in neighbours(graph)]
    order = greedy_order(graph).tolist()
    assert sorted(order) == list(range(len(vectors)))
    unvisited = set(range(len(vectors)))
    starts = 0
    for t, node in enumerate(order):
        previous = order[t - 1] if t else None
        open_neighbours = adjacency[previous] & unvisited if previous is not None else set()
        if open_neighbours:
            best = max(open_neighbours, key=lambda j: (vectors[previous] @ vectors[j], -j))
            assert node == best
        else:
            starts += 1
            degree = {d: len(adjacency[d] & unvisited) for d in unvisited}
            assert degree[node] == min(degree.values())
        unvisited.remove(node)
    assert starts >= 5  # at least one walk per cluster (clusters share no edges)


def test_clusters_that_fit_a_neighbour_list_stay_contiguous():
    sizes = [6, 9, 11, 4, 8, 11, 7]
    vectors, labels = clusters(sizes, spread=0.1, seed=1)
    result = order_embeddings(vectors, k=10, dedup=1.01)
    order = result.order
    assert sorted(order.tolist()) == list(range(len(labels)))
    changes = int((labels[order][1:] != labels[order][:-1]).sum())
    assert changes == len(sizes) - 1
    assert adjacent_similarity(vectors, order) > adjacent_similarity(vectors, np.arange(len(labels)))


def test_near_duplicates_keep_the_first_copy_only():
    rng = np.random.default_rng(0)
    base = normalise(rng.standard_normal((20, 16)))
    copies = normalise(base[:5] + 0.001 * rng.standard_normal((5, 16)))
    vectors = np.concatenate([base, copies])  # rows 20..24 copy rows 0..4
    sims, rows = self_knn(vectors, 3)
    keep = near_duplicates(sims, rows, 0.99)
    assert keep[:20].all() and not keep[20:].any()
    for i, row in enumerate(rows):  # no surviving pair is a near-duplicate
        for j, s in zip(row, sims[i]):
            assert not (keep[i] and keep[j] and s >= 0.99)
    assert near_duplicates(sims, rows, 1.01).all()
    result = order_embeddings(vectors, k=3, dedup=0.99)
    assert sorted(result.order.tolist()) == list(range(20))


def test_a_cluster_of_copies_larger_than_k_keeps_only_its_earliest():
    rng = np.random.default_rng(1)
    others = normalise(rng.standard_normal((30, 16)))
    original = normalise(rng.standard_normal((1, 16)))
    copies = normalise(original + 0.001 * rng.standard_normal((12, 16)))  # 12 near-copies, k = 4
    vectors = np.concatenate([others[:5], copies, others[5:]])  # the copies are rows 5..16
    sims, rows = self_knn(vectors, 4)
    keep = near_duplicates(sims, rows, 0.99)
    assert keep[5] and not keep[6:17].any()  # the earliest copy survives, none of the others
    assert keep[:5].all() and keep[17:].all()


def test_reference_variant_is_a_permutation_and_respects_its_cluster_cap_before_merging():
    vectors, _ = clusters([50, 50, 50], spread=0.6)
    _sims, rows = self_knn(vectors, 5)
    order = reference_order(rows, cluster_size=8)
    assert sorted(order.tolist()) == list(range(150))
    result = order_embeddings(vectors, k=5, variant="reference", dedup=1.01)
    assert sorted(result.order.tolist()) == list(range(150))
    random_order = np.random.default_rng(0).permutation(150)
    assert adjacent_similarity(vectors, result.order) > adjacent_similarity(vectors, random_order) + 0.3


def test_packing_puts_eos_between_documents_and_cuts_full_windows():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    windows, leftover = pack(docs, eos_id=0, window=4)
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0, 11, 0]
    assert windows == [stream[0:4], stream[4:8], stream[8:12]] and leftover == 3
    with_bos, leftover = pack(docs, eos_id=0, window=4, bos_id=99)
    assert with_bos == [[99, *stream[i:i + 3]] for i in (0, 3, 6, 9, 12)] and leftover == 0
    assert window_spans([len(d) + 1 for d in docs], 4) == [[0], [1, 2], [2]]


def test_window_spans_match_the_packed_stream():
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 30, size=200).tolist()
    owner = np.repeat(np.arange(200), lengths)
    spans = window_spans(lengths, 16)
    assert len(spans) == len(owner) // 16
    for w, span in enumerate(spans):
        assert span == sorted(set(owner[w * 16:(w + 1) * 16].tolist()))


def test_degenerate_corpora():
    one = normalise(np.ones((1, 8)))
    assert order_embeddings(one, k=10).order.tolist() == [0]
    with pytest.raises(DataError, match="empty corpus"):
        order_embeddings(np.zeros((0, 8), np.float32))
    few, _ = clusters([3])
    assert sorted(order_embeddings(few, k=50).order.tolist()) == [0, 1, 2]  # k beyond the corpus
    with pytest.raises(DataError, match="unknown ordering variant"):
        order_embeddings(few, variant="tsp")


@pytest.fixture(scope="module")
def gemma_tokenizer():
    return load_tokenizer(model_dir(None))


@pytest.fixture(scope="module")
def ordered_wiki(wiki_docs, minilm, gemma_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("icp")
    # One exact copy under a new id must be found and removed.
    rows = [json.loads(line) for line in wiki_docs.read_text().splitlines()]
    rows.append({**rows[5], "id": "copy-of-5"})
    docs = out / "docs.jsonl"
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = order_corpus(docs, out, k=5, window=256, embedder=minilm, tokenizer=gemma_tokenizer, progress=False)
    return out, rows, stats


def test_wikipedia_order_is_topical_and_complete(ordered_wiki, gemma_tokenizer):
    out, rows, stats = ordered_wiki
    assert stats["documents"] == 49 and stats["duplicates_removed"] == 1 and stats["ordered"] == 48
    order = [json.loads(line) for line in (out / "order.jsonl").read_text().splitlines()]
    ids = [o["id"] for o in order]
    assert sorted(ids) == sorted(r["id"] for r in rows[:48])
    cosine, topics = stats["adjacent_cosine"], stats["topics"]
    assert cosine["ordered"] > cosine["random"] + 0.2
    assert topics["ordered"]["window_purity"] > topics["random"]["window_purity"]
    titles = [o["title"] for o in order]
    assert sum(a != b for a, b in itertools.pairwise(titles)) <= 6  # 4 articles: few topic changes


def test_wikipedia_windows_are_the_ordered_documents_joined_by_eos(ordered_wiki, gemma_tokenizer):
    out, rows, stats = ordered_wiki
    windows = [json.loads(line) for line in (out / "windows.jsonl").read_text().splitlines()]
    assert len(windows) == stats["windows"] > 10
    assert all(len(w["input_ids"]) == 256 for w in windows)
    order = [json.loads(line)["id"] for line in (out / "order.jsonl").read_text().splitlines()]
    text = {r["id"]: r["text"] for r in rows}
    eos, bos = gemma_tokenizer.eos_token_id, gemma_tokenizer.bos_token_id
    assert stats["bos"] and all(w["input_ids"][0] == bos for w in windows)  # Gemma expects its BOS
    stream = [t for i in order for t in (*gemma_tokenizer(text[i], add_special_tokens=False)["input_ids"], eos)]
    chunks = [tuple(stream[w * 255:(w + 1) * 255]) for w in range(len(windows))]
    assert {tuple(w["input_ids"][1:]) for w in windows} == set(chunks)  # the same windows, shuffled
    assert [tuple(w["input_ids"][1:]) for w in windows] != chunks
    owner = [i for i in order for _ in range(len(gemma_tokenizer(text[i], add_special_tokens=False)["input_ids"]) + 1)]
    position = {chunk: w for w, chunk in enumerate(chunks)}
    for w in windows:  # each window names the documents it holds, in order
        start = position[tuple(w["input_ids"][1:])] * 255
        assert w["documents"] == list(dict.fromkeys(owner[start:start + 255]))


def test_icp_order_cli_writes_arrow_and_reports_bad_input(wiki_docs, tmp_path, capsys):
    out = tmp_path / "arrow"
    assert main(["train", "icp-order", "--docs", str(wiki_docs), "--out", str(out), "--k", "4", "--window", "512",
                 "--format", "arrow", "--variant", "reference", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    from datasets import load_from_disk

    windows = load_from_disk(str(out / "windows"))
    assert len(windows) == summary["windows"] and len(windows[0]["input_ids"]) == 512
    assert summary["ordered"] == 48
    bad = tmp_path / "dup.jsonl"
    bad.write_text('{"id": "a", "text": "one"}\n{"id": "a", "text": "two"}\n')
    assert main(["train", "icp-order", "--docs", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "dup.jsonl:2: duplicate id 'a'" in capsys.readouterr().err


def test_a_one_document_corpus_orders_to_itself(minilm, gemma_tokenizer, tmp_path):
    docs = tmp_path / "one.jsonl"
    docs.write_text(json.dumps({"id": "only", "text": "A single short document."}) + "\n")
    stats = order_corpus(docs, tmp_path / "out", k=10, window=4, embedder=minilm, tokenizer=gemma_tokenizer,
                         progress=False)
    assert stats["ordered"] == 1 and stats["windows"] >= 1
    assert stats["adjacent_cosine"]["ordered"] is None  # no adjacent pair: null, not NaN
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["documents"] == 1
    assert [json.loads(line)["id"] for line in (tmp_path / "out" / "order.jsonl").read_text().splitlines()] == ["only"]
