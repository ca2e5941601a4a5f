"""Inner-product faiss indexes over unit vectors (so scores are cosine similarities).

`kind="auto"` picks exact search (Flat) below ~1e5 vectors, where it is fast enough and exact, and an
inverted-file index (IVF) above, where exact search over every pair stops being affordable. HNSW is
available by name: faster queries than IVF at the price of a slower build and more memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from steer.files import atomic_path, atomic_write_text

from .embedders import RetrievalError

KINDS = ("auto", "flat", "ivf", "hnsw")
AUTO_IVF_FROM = 100_000
INDEX_FILE, META_FILE = "index.faiss", "index.json"


@dataclass
class IndexMeta:
    kind: str
    dim: int
    embedder: str | None = None
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int | None = None
    ef_search: int | None = None


def choose_kind(n: int, kind: str = "auto") -> str:
    if kind not in KINDS:
        raise RetrievalError(f"unknown index kind {kind!r}: choose one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n < AUTO_IVF_FROM else "ivf"


def default_nlist(n: int) -> int:
    """About 4·sqrt(n) lists, the usual faiss rule of thumb, with enough points per list to train."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def _as_matrix(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise RetrievalError(f"expected a 2-d array of vectors, got shape {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise RetrievalError(f"vectors have dimension {vectors.shape[1]} but the index has dimension {dim}")
    return vectors


class VectorIndex:
    """A faiss index plus what is needed to use it safely later (kind, dimension, embedder name)."""

    def __init__(self, index, meta: IndexMeta):
        self.index = index
        self.meta = meta

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str = "auto", embedder: str | None = None, *,
              nlist: int | None = None, nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 64,
              train_size: int = 100_000, seed: int = 0, progress: bool = False) -> VectorIndex:
        """An index holding `vectors` (row i gets id i). IVF is trained on a random sample of them."""
        import faiss

        vectors = np.asarray(vectors)
        n, dim = vectors.shape
        if n == 0:
            raise RetrievalError("cannot build an index of an empty collection")
        kind = choose_kind(n, kind)
        meta = IndexMeta(kind=kind, dim=dim, embedder=embedder)
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = max(40, 2 * hnsw_m)
            index.hnsw.efSearch = ef_search
            meta.hnsw_m, meta.ef_search = hnsw_m, ef_search
        else:
            nlist = nlist or default_nlist(n)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(seed).choice(n, size=min(n, max(train_size, 39 * nlist)), replace=False)
            index.train(_as_matrix(vectors[np.sort(sample)]))
            meta.nlist, meta.nprobe = nlist, min(nlist, nprobe or max(16, nlist // 128))
            index.nprobe = meta.nprobe
        built = cls(index, meta)
        built.add(vectors, progress=progress)
        return built

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray, batch: int = 65_536, progress: bool = False) -> None:
        for start in tqdm(range(0, len(vectors), batch), desc="indexing", disable=not progress):
            self.index.add(_as_matrix(vectors[start:start + batch], self.meta.dim))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row numbers), each (len(queries), min(k, len(self))), best first."""
        if k < 1:
            raise RetrievalError(f"k must be at least 1, got {k}")
        queries = _as_matrix(np.atleast_2d(queries), self.meta.dim)
        scores, rows = self.index.search(queries, min(k, len(self)))
        return scores, rows

    def save(self, directory: str | Path) -> Path:
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / INDEX_FILE) as temporary:
            faiss.write_index(self.index, str(temporary))
        atomic_write_text(directory / META_FILE, json.dumps({**asdict(self.meta), "count": len(self)}, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> VectorIndex:
        import faiss

        directory = Path(directory)
        if not (directory / INDEX_FILE).is_file() or not (directory / META_FILE).is_file():
            raise RetrievalError(f"{directory}: not an index directory (no {INDEX_FILE} and {META_FILE})")
        try:
            stored = json.loads((directory / META_FILE).read_text())
            count = stored.pop("count", None)
            meta = IndexMeta(**stored)
        except (ValueError, TypeError) as e:
            raise RetrievalError(f"{directory / META_FILE}: not an index description ({e})") from None
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as e:  # faiss reports a truncated or foreign file this way
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
            raise RetrievalError(f"{directory / INDEX_FILE}: not a readable faiss index (corrupt or cut off: "
                                 f"{reason}); rebuild it with `steer index build`") from None
        if index.d != meta.dim or (count is not None and index.ntotal != count):
            raise RetrievalError(f"{directory / INDEX_FILE} does not match {META_FILE}: rebuild the index")
        if meta.nprobe:
            index.nprobe = meta.nprobe
        if meta.ef_search:
            index.hnsw.efSearch = meta.ef_search
        return cls(index, meta)


def exact_knn(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The true top-k by inner product (a Flat index), for measuring an approximate index's recall."""
    return VectorIndex.build(vectors, kind="flat").search(queries, k)


def self_knn(vectors: np.ndarray, k: int, index: VectorIndex | None = None, batch: int = 16_384,
             progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every vector's k nearest *other* vectors: (similarities, rows), each (n, k), best first.

    Queried in batches, so the result is the only O(n·k) memory beyond the index. Rows are -1 (with
    similarity -inf) where fewer than k other vectors exist. A vector's own row is dropped even when
    the index returns it below exact duplicates of it.
    """
    n = len(vectors)
    if n == 0:
        raise RetrievalError("cannot search the neighbours of an empty collection")
    if k < 1:
        raise RetrievalError(f"k must be at least 1, got {k}")
    index = index or VectorIndex.build(vectors)
    sims = np.full((n, k), -np.inf, dtype=np.float32)
    rows = np.full((n, k), -1, dtype=np.int64)
    width = min(k + 1, len(index))
    for start in tqdm(range(0, n, batch), desc="kNN", unit="batch", disable=not progress):
        stop = min(start + batch, n)
        s, r = index.search(vectors[start:stop], width)
        own = (r == np.arange(start, stop)[:, None]) | (r < 0)
        # Stable sort moves the vector itself (or an empty slot) behind the real neighbours.
        keep = np.argsort(own, axis=1, kind="stable")[:, :min(k, width)]
        s, r, own = (np.take_along_axis(a, keep, axis=1) for a in (s, r, own))
        rows[start:stop, :r.shape[1]] = np.where(own, -1, r)
        sims[start:stop, :s.shape[1]] = np.where(own, -np.inf, s)
    return sims, rows
