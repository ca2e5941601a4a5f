"""A retriever: an embedder, an index and the passages behind it, saved together in one directory.

`steer index build` writes the directory; steering programs, RA-DIT and `steer index search` read it.
The directory records which embedder built the index, and a retriever refuses a different one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from steer.files import atomic_open, atomic_path

from .corpus import Document, embed_documents, load_documents
from .embedders import MINILM, Embedder, RetrievalError
from .loading import load_embedder
from .index import VectorIndex

DOCUMENTS = "documents.jsonl"


@dataclass(frozen=True)
class Hit:
    id: str
    text: str
    score: float
    title: str | None = None


class Retriever:
    """Top-k passages for a query, by cosine similarity of embeddings."""

    def __init__(self, embedder: Embedder, index: VectorIndex, documents: list[Document]):
        if index.meta.embedder is not None and index.meta.embedder != embedder.name:
            raise RetrievalError(f"the index was built with the embedder {index.meta.embedder!r}, "
                                 f"not {embedder.name!r}: rebuild it or load that embedder")
        if index.meta.dim != embedder.dim:
            raise RetrievalError(f"the embedder gives {embedder.dim}-d vectors but the index holds "
                                 f"{index.meta.dim}-d ones")
        if len(index) != len(documents):
            raise RetrievalError(f"the index holds {len(index)} vectors but there are {len(documents)} documents")
        self.embedder, self.index, self.documents = embedder, index, documents
        self._cache: dict[tuple[str, int], list[Hit]] = {}

    @classmethod
    def load(cls, directory: str | Path, embedder: Embedder | None = None) -> Retriever:
        """The retriever saved in `directory`; the embedder is loaded from its recorded name unless given."""
        directory = Path(directory)
        index = VectorIndex.load(directory)
        documents = load_documents(directory / DOCUMENTS)
        if embedder is None:
            spec = index.meta.embedder
            embedder = load_embedder(None if spec == MINILM else spec)
        return cls(embedder, index, documents)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The top-k hits for one query; repeated queries (every particle of a program asks the same
        one) are answered from a cache."""
        if (query, k) not in self._cache:
            self._cache[query, k] = self.search_many([query], k)[0]
        return self._cache[query, k]

    def passages(self, query: str, k: int = 5) -> list[str]:
        return [hit.text for hit in self.search(query, k)]

    def search_many(self, queries: list[str], k: int = 5) -> list[list[Hit]]:
        vectors = self.embedder.embed_queries(queries)
        scores, rows = self.index.search(vectors, k)
        return [[self._hit(r, s) for r, s in zip(row, score) if r >= 0] for row, score in zip(rows, scores)]

    def _hit(self, row: int, score: float) -> Hit:
        d = self.documents[row]
        return Hit(d.id, d.text, float(score), d.title)


def background_prompt(passages: list[str], prompt: str) -> str:
    """A prompt with retrieved passages in front ("Background: ..."), the format RA-DIT trains on.
    One passage per prompt gives separate contexts; all of them, one concatenated context."""
    return "".join(f"Background: {p}\n\n" for p in passages) + prompt


def build_retriever(docs: str | Path, out: str | Path, embedder: Embedder | None = None, kind: str = "auto",
                    batch_size: int = 64, limit: int | None = None, progress: bool = True,
                    **index_options) -> Retriever:
    """Embed every document of a JSONL file, index the vectors and save all of it in `out`.

    `out` then holds `index.faiss`, `index.json` (kind, dimension, embedder), `documents.jsonl`,
    and the raw `embeddings.npy` with `ids.json` (so the corpus can be re-indexed or ordered without
    embedding it again).
    """
    documents = load_documents(docs, limit=limit)
    embedder = embedder or load_embedder()
    # Built in a folder beside `out` that replaces it whole at the end: a build that fails or is killed
    # leaves an earlier index as it was, never a mix of old and new files.
    with atomic_path(out) as staging:
        staging.mkdir()
        vectors = embed_documents(embedder, [d.text for d in documents], staging, ids=[d.id for d in documents],
                                  batch_size=batch_size, progress=progress)
        index = VectorIndex.build(np.asarray(vectors), kind=kind, embedder=embedder.name, progress=progress,
                                  **index_options)
        index.save(staging)
        with atomic_open(staging / DOCUMENTS) as f:
            for d in documents:
                row = {k: v for k, v in asdict(d).items() if v is not None}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Retriever(embedder, index, documents)

