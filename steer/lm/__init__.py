"""The model side: vocabularies, tokens, the `LanguageModel` interface and the backends that serve
batched next-token log-probabilities.

It knows nothing of contexts, programs or samplers: `steer.constraints` and `steer.context` sit on top."""

from ..files import cache_dir
from .base import LanguageModel, ModelState, Token, Vocabulary
from .hf import HFLanguageModel
from .loading import default_model_path, load_model, tiny_model
from .registry import backend_names, backends, register_backend

__all__ = ["HFLanguageModel", "LanguageModel", "ModelState", "Token", "Vocabulary", "backend_names", "backends",
           "cache_dir", "default_model_path", "load_model", "register_backend", "tiny_model"]
