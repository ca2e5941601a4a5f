"""In-Context Pretraining ordering (Shi et al. 2023, arXiv 2310.10638).

Reorder a corpus so that each fixed-length training window holds related documents, every document
exactly once: embed, find each document's k nearest neighbours, drop near-duplicates, walk the kNN
graph greedily (always to the most similar unvisited neighbour, restarting at an unvisited document
of minimum degree), then concatenate in that order with EOS between documents and cut into windows.

Everything after the embeddings is O(N·k): the graph is a CSR array, each adjacency list is scanned
at most once (a node is left for good once visited), and restarts walk one degree-sorted list.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from steer.files import atomic_open, atomic_write_text

from retrieval.corpus import (
    Document,
    cached_embeddings,
    embed_documents,
    load_documents,
)
from retrieval.embedders import MINILM, Embedder
from retrieval.loading import load_embedder
from retrieval.index import VectorIndex, self_knn
from retrieval.llm_embedder import starts_with_bos
from steer.jsonl import DataError

from .common import finite

log = logging.getLogger(__name__)

VARIANTS = ("icp", "reference")


@dataclass
class Graph:
    """An undirected kNN graph in CSR form; each node's neighbours are sorted by similarity, best first."""

    indptr: np.ndarray  # (n + 1,)
    indices: np.ndarray  # (edges,)
    weights: np.ndarray  # (edges,)

    @property
    def degree(self) -> np.ndarray:
        return np.diff(self.indptr)


def near_duplicates(sims: np.ndarray, rows: np.ndarray, threshold: float) -> np.ndarray:
    """A keep-mask: near-duplicates (kNN neighbours at cosine >= `threshold`) are linked, and of each
    connected group of linked documents only the earliest is kept, however large the group is (a
    cluster of copies larger than k is linked through the copies' own lists)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(sims)
    keep = np.ones(n, dtype=bool)
    if threshold > 1:
        return keep
    close = (sims >= threshold) & (rows >= 0)
    src = np.repeat(np.arange(n), rows.shape[1])[close.ravel()]
    dst = rows.ravel()[close.ravel()]
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    first = np.full(component.max() + 1, n)
    np.minimum.at(first, component, np.arange(n))
    return first[component] == np.arange(n)


def knn_graph(sims: np.ndarray, rows: np.ndarray, keep: np.ndarray | None = None) -> Graph:
    """The undirected graph of the kNN lists among kept documents (an edge i–j exists when either is
    in the other's list; its weight is their similarity)."""
    n, k = rows.shape
    keep = np.ones(n, dtype=bool) if keep is None else keep
    src = np.repeat(np.arange(n, dtype=np.int64), k)
    dst, w = rows.ravel(), sims.ravel()
    valid = (dst >= 0) & (src != dst)
    valid[valid] &= keep[src[valid]] & keep[dst[valid]]
    src, dst, w = src[valid], dst[valid], w[valid]
    a, b, w = np.concatenate([src, dst]), np.concatenate([dst, src]), np.concatenate([w, w])
    order = np.lexsort((b, a))
    a, b, w = a[order], b[order], w[order]
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])  # both directions of one edge: keep one
    a, b, w = a[first], b[first], w[first]
    order = np.lexsort((-w, a))  # within each node, most similar first
    a, b, w = a[order], b[order], w[order]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(a, minlength=n), out=indptr[1:])
    return Graph(indptr, b, w.astype(np.float32))


def greedy_order(graph: Graph, keep: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
    """The paper's traversal (its Algorithm 1): start at a document of minimum degree, repeatedly move
    to the most similar unvisited neighbour, and when none is left start again at a document of
    minimum degree. Visited documents leave the graph, so degrees count unvisited neighbours only:
    a restart then picks up the leftovers at the edge of what was walked before opening a new region.
    Returns every kept document exactly once.

    A bucket queue keyed by degree (entries made stale by a later decrement are skipped) keeps this
    O(N·k): each visit decrements its neighbours' degrees once, and each adjacency list is scanned once.
    Ties go to the document whose degree dropped last, then to the lower row number.
    """
    n = len(graph.indptr) - 1
    keep = np.ones(n, dtype=bool) if keep is None else keep
    total = int(keep.sum())
    indptr, indices = graph.indptr.tolist(), graph.indices.tolist()
    degree = np.diff(graph.indptr).tolist()
    visited = bytearray((~keep).astype(np.uint8).tobytes())
    buckets: list[list[int]] = [[] for _ in range(max(degree, default=0) + 1)]
    for node in sorted(np.flatnonzero(keep).tolist(), key=lambda i: (degree[i], -i)):
        buckets[degree[node]].append(node)  # popped from the end: lowest row first
    lowest = 0
    order: list[int] = []
    with tqdm(total=total, desc="ordering", unit="doc", disable=not progress, mininterval=1) as bar:
        while len(order) < total:
            while True:  # the unvisited document of minimum remaining degree
                while not buckets[lowest]:
                    lowest += 1
                node = buckets[lowest].pop()
                if not visited[node] and degree[node] == lowest:
                    break
            walked = 0
            while True:
                visited[node] = 1
                order.append(node)
                walked += 1
                best = -1
                for p in range(indptr[node], indptr[node + 1]):
                    other = indices[p]
                    if visited[other]:
                        continue
                    if best < 0:
                        best = other  # lists are sorted by similarity: the first unvisited is the best
                    d = degree[other] - 1
                    degree[other] = d
                    buckets[d].append(other)
                    lowest = min(lowest, d)
                if best < 0:
                    break
                node = best
            bar.update(walked)
    return np.asarray(order, dtype=np.int64)


def reference_order(rows: np.ndarray, keep: np.ndarray | None = None, cluster_size: int = 21) -> np.ndarray:
    """The released code's variant, for comparison: follow the current document's *own* top-k list
    to its first unvisited entry, start a new cluster (at the next unvisited document) when there is
    none or the cluster holds `cluster_size` documents, then merge each short cluster into the
    cluster of its first neighbour outside it, just before that neighbour."""
    n = len(rows)
    keep = np.ones(n, dtype=bool) if keep is None else keep
    visited = ~keep
    clusters: list[list[int]] = []
    cluster_of = np.full(n, -1, dtype=np.int64)
    rows_list = rows.tolist()
    next_unvisited = 0
    current: list[int] = []
    node = -1
    for _ in range(int(keep.sum())):
        step = -1
        if node >= 0 and len(current) < cluster_size:
            step = next((j for j in rows_list[node] if j >= 0 and not visited[j]), -1)
        if step < 0:
            while visited[next_unvisited]:
                next_unvisited += 1
            step = next_unvisited
            current = []
            clusters.append(current)
        node = step
        visited[node] = True
        cluster_of[node] = len(clusters) - 1
        current.append(node)
    for c, members in enumerate(clusters):
        if not members or len(members) >= cluster_size:
            continue
        for doc in list(members):
            target = next((j for j in rows_list[doc] if j >= 0 and keep[j] and cluster_of[j] != c), -1)
            if target < 0:
                continue
            destination = clusters[cluster_of[target]]
            destination.insert(destination.index(target), doc)
            members.remove(doc)
            cluster_of[doc] = cluster_of[target]
    return np.asarray([d for members in clusters for d in members], dtype=np.int64)


def adjacent_similarity(vectors: np.ndarray, order: np.ndarray, chunk: int = 65_536) -> float:
    """Mean cosine similarity of consecutive documents in `order` (unit vectors)."""
    if len(order) < 2:
        return float("nan")
    total = 0.0
    for start in range(0, len(order) - 1, chunk):
        left = np.asarray(vectors[order[start:start + chunk]])
        right = np.asarray(vectors[order[start + 1:start + chunk + 1]])
        total += float(np.einsum("ij,ij->", left[:len(right)], right))
    return total / (len(order) - 1)


def window_spans(lengths: Sequence[int], window: int) -> list[list[int]]:
    """For documents of these token lengths (EOS included) laid end to end, the positions (in that
    sequence) of the documents that appear in each full window. The tail shorter than a window is dropped."""
    spans: list[list[int]] = [[] for _ in range(sum(lengths) // window)]
    position = 0
    for i, length in enumerate(lengths):
        last = min((position + length - 1) // window, len(spans) - 1)
        for w in range(position // window, last + 1):
            spans[w].append(i)
        position += length
    return spans


def topic_purity(spans: list[list[int]], topics: Sequence[str]) -> dict[str, float]:
    """How topical an order is: the share of consecutive documents with one topic, the share of
    windows whose documents all have one topic, and the mean share of a window's documents that
    belong to its most common topic."""
    adjacent = float(np.mean([a == b for a, b in itertools.pairwise(topics)])) if len(topics) > 1 else float("nan")
    if not spans:
        return {"adjacent_same_topic": adjacent, "single_topic_windows": float("nan"), "window_purity": float("nan")}
    single, purity = 0, 0.0
    for span in spans:
        counts = Counter(topics[i] for i in span)
        single += len(counts) == 1
        purity += max(counts.values()) / len(span)
    return {"adjacent_same_topic": adjacent, "single_topic_windows": single / len(spans),
            "window_purity": purity / len(spans)}


def pack(token_ids: Sequence[Sequence[int]], eos_id: int, window: int,
         bos_id: int | None = None) -> tuple[list[list[int]], int]:
    """Documents (in order) joined with EOS after each and cut into windows of `window` tokens.
    With `bos_id`, every window starts with it (models such as Gemma are lost without their BOS)
    and holds window - 1 tokens of the stream. Returns the full windows and the number of tokens
    left over at the end."""
    stream = np.fromiter((t for ids in token_ids for t in (*ids, eos_id)), dtype=np.int64)
    body = window - (bos_id is not None)
    full = len(stream) // body
    windows = stream[:full * body].reshape(full, body)
    if bos_id is not None:
        windows = np.concatenate([np.full((full, 1), bos_id, dtype=np.int64), windows], axis=1)
    return windows.tolist(), len(stream) - full * body


@dataclass
class Ordering:
    """The ordered corpus: row numbers into the original documents, and what was removed."""

    order: np.ndarray
    keep: np.ndarray
    graph: Graph
    sims: np.ndarray
    rows: np.ndarray
    seconds: dict[str, float]


def order_embeddings(vectors: np.ndarray, k: int = 10, dedup: float = 0.95, variant: str = "icp",
                     index_kind: str = "auto", cluster_size: int = 21, progress: bool = False,
                     **index_options) -> Ordering:
    """kNN, near-duplicate removal and traversal over unit vectors (embedding excluded)."""
    if variant not in VARIANTS:
        raise DataError(f"unknown ordering variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    n = len(vectors)
    if n == 0:
        raise DataError("cannot order an empty corpus")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if n == 1:
        sims, rows = np.full((1, k), -np.inf, np.float32), np.full((1, k), -1, np.int64)
    else:
        index = VectorIndex.build(vectors, kind=index_kind, progress=progress, **index_options)
        seconds["index"] = time.perf_counter() - t
        sims, rows = self_knn(vectors, k, index=index, progress=progress)
    seconds["knn"] = time.perf_counter() - t - seconds.get("index", 0.0)
    t = time.perf_counter()
    keep = near_duplicates(sims, rows, dedup)
    seconds["dedup"] = time.perf_counter() - t
    t = time.perf_counter()
    graph = knn_graph(sims, rows, keep)
    seconds["graph"] = time.perf_counter() - t
    t = time.perf_counter()
    order = greedy_order(graph, keep, progress) if variant == "icp" else reference_order(rows, keep, cluster_size)
    seconds["traversal"] = time.perf_counter() - t
    return Ordering(order, keep, graph, sims, rows, seconds)


def order_corpus(docs: str | Path, out: str | Path, *, k: int = 10, window: int = 2048, dedup: float = 0.95,
                 variant: str = "icp", embedder: Embedder | None = None, tokenizer=None,
                 output_format: str = "jsonl", seed: int = 0, limit: int | None = None,
                 batch_size: int = 64, progress: bool = True) -> dict:
    """The whole pipeline on a JSONL corpus; writes `order.jsonl`, the windows and `stats.json` to `out`.

    Embeddings are kept in `out/embeddings.npy` and reused when the same documents are ordered again
    with the same embedder (a different k, threshold or window does not embed twice).
    """
    documents = load_documents(docs, limit=limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vectors = _embeddings(documents, out, embedder, batch_size, progress)
    result = order_embeddings(vectors, k=k, dedup=dedup, variant=variant, progress=progress)
    tokenizer = tokenizer or _default_tokenizer()
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to put between documents")
    ordered = [documents[i] for i in result.order]
    token_ids = tokenizer([d.text for d in ordered], add_special_tokens=False)["input_ids"]
    bos = starts_with_bos(tokenizer)
    windows, leftover = pack(token_ids, tokenizer.eos_token_id, window, bos)
    lengths = [len(ids) + 1 for ids in token_ids]
    body = window - (bos is not None)
    spans = window_spans(lengths, body)
    shuffle = np.random.default_rng(seed).permutation(len(windows))
    with atomic_open(out / "order.jsonl") as f:
        f.writelines(json.dumps({"position": p, "id": d.id, "title": d.title}, ensure_ascii=False) + "\n"
                     for p, d in enumerate(ordered))
    window_rows = [{"input_ids": windows[w], "documents": [ordered[i].id for i in spans[w]]} for w in shuffle]
    _write_windows(out, window_rows, output_format)
    stats = _stats(documents, vectors, result, lengths, spans, body, leftover, k, dedup, variant, seed)
    stats["window"], stats["bos"] = window, bos is not None
    stats = finite(stats)  # a one-document corpus has no adjacent pairs: null, not NaN
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2))
    return stats


def _embeddings(documents: list[Document], out: Path, embedder: Embedder | None, batch_size: int,
                progress: bool) -> np.ndarray:
    ids = [d.id for d in documents]
    cached = cached_embeddings(out, embedder.name if embedder else MINILM, ids)
    if cached is not None:
        return cached
    return embed_documents(embedder or load_embedder(), [d.text for d in documents], out, ids=ids,
                           batch_size=batch_size, progress=progress)


def _default_tokenizer():
    from .common import load_tokenizer, model_dir

    return load_tokenizer(model_dir(None))


def _write_windows(out: Path, rows: list[dict], output_format: str) -> None:
    if output_format == "jsonl":
        with atomic_open(out / "windows.jsonl") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    elif output_format == "arrow":
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(out / "windows"))
    else:
        raise DataError(f"unknown windows format {output_format!r}: choose jsonl or arrow")


def _stats(documents, vectors, result: Ordering, lengths, spans, window, leftover, k, dedup, variant, seed) -> dict:
    """Counts, and how related neighbouring documents are in this order against a random order, the
    other variant and (where documents have titles) the corpus's own order."""
    kept = np.flatnonzero(result.keep)
    orders = {"ordered": result.order, "random": np.random.default_rng(seed).permutation(kept),
              "reference" if variant == "icp" else "icp":
                  reference_order(result.rows, result.keep) if variant == "icp" else greedy_order(result.graph, result.keep),
              "corpus": kept}
    stats = {
        "documents": len(documents), "duplicates_removed": int(len(documents) - len(kept)), "ordered": len(kept),
        "k": k, "dedup_threshold": dedup, "variant": variant, "window": window, "windows": len(spans),
        "tokens": int(sum(lengths)), "tokens_dropped": int(leftover),
        "mean_degree": float(result.graph.degree[kept].mean()) if len(kept) else 0.0,
        "adjacent_cosine": {name: adjacent_similarity(vectors, order) for name, order in orders.items()},
        "seconds": result.seconds,
    }
    if all(d.title for d in documents):
        stats["topics"] = {name: topic_purity(window_spans(relisted(lengths, result.order, order), window),
                                              [documents[r].title for r in order.tolist()])
                           for name, order in orders.items()}
    return stats


def relisted(lengths: Sequence[int], order: np.ndarray, other: np.ndarray) -> list[int]:
    """Token lengths re-listed for another order of the same documents."""
    by_row = dict(zip(order.tolist(), lengths))
    return [by_row[r] for r in other.tolist()]
