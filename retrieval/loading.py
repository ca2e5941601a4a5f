"""Which embedder a name or directory stands for, and the dual embedder of a tuned query encoder."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from .embedders import MINILM, Embedder, RetrievalError, SentenceEmbedder
from .llm_embedder import LLMEmbedder


class DualEmbedder:
    """Passages by one embedder, queries by a separately tuned encoder (RA-DIT's R-ft): the passage
    space, and so the index, stay those of the passage embedder, whose name this embedder carries."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, "dual.json")) as f:
            spec = json.load(f)
        self.passage_embedder = load_embedder(spec["passage_embedder"])
        self.query_encoder = SentenceEmbedder(os.path.join(directory, spec["query_encoder"]))
        self.name, self.dim = self.passage_embedder.name, self.passage_embedder.dim
        if self.query_encoder.dim != self.dim:
            raise RetrievalError(f"{directory}: the query encoder gives {self.query_encoder.dim}-d vectors but "
                                 f"passages are {self.dim}-d")

    def embed_passages(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return self.passage_embedder.embed_passages(texts, batch_size, progress)

    def embed_queries(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return self.query_encoder.embed_queries(texts, batch_size, progress)


def load_embedder(spec: str | None = None) -> Embedder:
    """The embedder a name or directory stands for: None or "minilm" is all-MiniLM-L6-v2; a
    directory holding a sentence-transformers model is loaded as one; a causal LM directory (LLaRA-adapted
    by `steer train llara`, or plain) becomes an LLM embedder."""
    if spec in (None, "minilm", MINILM):
        return SentenceEmbedder()
    if not os.path.isdir(spec):
        raise RetrievalError(f"unknown embedder {spec!r}: give 'minilm' or a local model directory")
    if os.path.isfile(os.path.join(spec, "dual.json")):
        return DualEmbedder(spec)
    if os.path.isfile(os.path.join(spec, "modules.json")):
        return SentenceEmbedder(spec)
    if os.path.isfile(os.path.join(spec, "config.json")):
        return LLMEmbedder.load(spec)
    raise RetrievalError(f"{spec}: neither a sentence-transformers nor a causal LM directory")
