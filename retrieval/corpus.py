"""Document collections: read and checked once, embedded in batches, stored as `.npy` beside their ids.

Embeddings are written straight into a memory-mapped `.npy` file, batch by batch, so a corpus larger
than memory can be embedded and later read back without loading it whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from steer.files import atomic_path, atomic_write_text
from steer.jsonl import DataError, read_jsonl

from .embedders import Embedder

EMBEDDINGS, IDS, EMBEDDER = "embeddings.npy", "ids.json", "embedder.json"


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str | None = None


def load_documents(path: str | Path, text_field: str = "text", id_field: str = "id",
                   limit: int | None = None) -> list[Document]:
    """Documents of a JSONL file (`id`, `text`, optional `title`); a missing id becomes the line number.

    Duplicate ids and documents without text are errors naming both lines: either would make an
    ordering or an index silently wrong.
    """
    documents: list[Document] = []
    seen: dict[str, int] = {}
    for number, row in read_jsonl(path):
        if limit is not None and len(documents) >= limit:
            break
        text = row.get(text_field)
        if not isinstance(text, str):
            got = "missing" if text is None else f"a {type(text).__name__}"
            raise DataError(f"{path}:{number}: field {text_field!r} must be a string ({got})")
        if not text.strip():
            raise DataError(f"{path}:{number}: field {text_field!r} is empty: a document needs text")
        doc_id = str(row.get(id_field, number))
        if doc_id in seen:
            raise DataError(f"{path}:{number}: duplicate id {doc_id!r} (first on line {seen[doc_id]})")
        seen[doc_id] = number
        title = row.get("title")
        documents.append(Document(doc_id, text, title if isinstance(title, str) else None))
    return documents


def embed_documents(embedder: Embedder, texts: list[str], out: str | Path | None = None,
                    ids: list[str] | None = None, batch_size: int = 64, chunk: int = 4096,
                    progress: bool = True) -> np.ndarray:
    """Passage embeddings of `texts`, (n, dim) float32 and unit length.

    With `out`, they are written chunk by chunk into `out/embeddings.npy` and returned memory-mapped;
    the documents' `ids` go to `ids.json` and the embedder's name to `embedder.json` beside them.
    """
    n = len(texts)
    if out is None:
        return embedder.embed_passages(texts, batch_size=batch_size, progress=progress)
    if ids is None or len(ids) != n:
        raise ValueError("embeddings written to disk need one id per text")
    path = Path(out) / EMBEDDINGS
    # The matrix is filled under a temporary name and renamed last, after its ids: a run killed on
    # the way leaves the previous embeddings whole (or none), never a half-filled matrix.
    with atomic_path(path) as temporary:
        matrix = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=(n, embedder.dim))
        with tqdm(total=n, desc="embedding", unit="doc", disable=not progress) as bar:
            for start in range(0, n, chunk):
                matrix[start:start + chunk] = embedder.embed_passages(texts[start:start + chunk],
                                                                      batch_size=batch_size)
                bar.update(min(chunk, n - start))
        matrix.flush()
        del matrix
        atomic_write_text(Path(out, IDS), json.dumps(ids))
        atomic_write_text(Path(out, EMBEDDER), json.dumps({"name": embedder.name, "dim": embedder.dim}))
    return np.load(path, mmap_mode="r")


def cached_embeddings(directory: str | Path, embedder_name: str, ids: list[str]) -> np.ndarray | None:
    """The embeddings stored in `directory` if the embedder `embedder_name` made them for exactly
    these `ids` (in this order), else None."""
    directory = Path(directory)
    if not all((directory / f).is_file() for f in (EMBEDDINGS, IDS, EMBEDDER)):
        return None
    if json.loads((directory / EMBEDDER).read_text()).get("name") != embedder_name:
        return None
    vectors, stored = load_embeddings(directory)
    return vectors if stored == ids else None


def load_embeddings(directory: str | Path) -> tuple[np.ndarray, list[str]]:
    """(memory-mapped embeddings, ids) as written by `embed_documents`."""
    directory = Path(directory)
    vectors = np.load(directory / EMBEDDINGS, mmap_mode="r")
    ids = json.loads((directory / IDS).read_text())
    if len(ids) != len(vectors):
        raise DataError(f"{directory}: {len(ids)} ids but {len(vectors)} embeddings")
    return vectors, ids
