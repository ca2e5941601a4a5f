"""The model side: contexts, vocabularies and the backends that serve batched next-token log-probabilities.

It knows nothing of programs or samplers; `constraints` and the distributions sit on top of it."""

from .base import LanguageModel, LMContext, Token, Vocabulary
from .hf import HFLanguageModel
from .loading import cache_dir, default_model_path, load_model, tiny_model

__all__ = ["HFLanguageModel", "LMContext", "LanguageModel", "Token", "Vocabulary", "cache_dir",
           "default_model_path", "load_model", "tiny_model"]
