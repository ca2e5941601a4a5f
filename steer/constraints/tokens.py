"""Per-token string properties of a vocabulary, computed once per tokenizer and cached on disk.

Every mask is a few vector operations over these arrays instead of a Python loop over the 262,144
tokens of Gemma's vocabulary.  Computing them takes a few seconds; the arrays are saved under the
steer cache (`$STEER_CACHE/tokens/<hash of the vocabulary>.npz`) and load in milliseconds after that.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import re
from functools import cached_property

import numpy as np

from ..files import atomic_open, cache_dir
from ..lm.base import Vocabulary

log = logging.getLogger(__name__)
_LETTERS = re.compile(r"[^\W\d_]+")
_FORMAT = 4  # bump when the arrays change
_PER_TOKEN = ("lead", "inner", "inner_min", "trail", "breaks", "runs", "ascii_lo", "ascii_hi", "nonascii")
_FIELDS = (*_PER_TOKEN, "sorted_ids", "prefix_end")


def _compute(strings: list[str], text: np.ndarray) -> dict[str, np.ndarray]:
    n = len(strings)
    a = {"lead": np.zeros(n, np.int32), "inner": np.zeros(n, np.int32), "inner_min": np.zeros(n, np.int32), "trail": np.zeros(n, np.int32),
         "breaks": np.zeros(n, bool), "runs": np.zeros(n, np.int32), "ascii_lo": np.zeros(n, np.uint64),
         "ascii_hi": np.zeros(n, np.uint64), "nonascii": np.zeros(n, bool)}
    for i, s in enumerate(strings):
        if not s or not text[i]:
            continue
        a["ascii_lo"][i], a["ascii_hi"][i] = ascii_bits(s)
        a["nonascii"][i] = not s.isascii()
        runs = [(m.start(), m.end()) for m in _LETTERS.finditer(s)]
        a["runs"][i] = len(runs)
        if runs == [(0, len(s))]:
            a["lead"][i] = len(s)
            continue
        a["breaks"][i] = True
        inner = [e - b for b, e in runs if b > 0 and e < len(s)]
        a["inner"][i], a["inner_min"][i] = max(inner, default=0), min(inner, default=0)
        if runs and runs[0][0] == 0:
            a["lead"][i] = runs[0][1]
        if runs and runs[-1][1] == len(s):
            a["trail"][i] = runs[-1][1] - runs[-1][0]
    # the text tokens in string order, and where the run of strings that start with each one ends
    order = sorted((s, i) for i, s in enumerate(strings) if s and text[i])
    a["sorted_ids"] = np.array([i for _, i in order], dtype=np.int64)
    a["prefix_end"] = np.empty(len(order), dtype=np.int64)
    open_: list[int] = []  # places whose string begins every string since
    for k, (s, _) in enumerate(order):
        while open_ and not s.startswith(order[open_[-1]][0]):
            a["prefix_end"][open_.pop()] = k
        open_.append(k)
    a["prefix_end"][open_] = len(order)
    return a


def ascii_bits(chars: str) -> tuple[int, int]:
    """The (low, high) bit sets of the ASCII characters in `chars`."""
    lo = hi = 0
    for ch in set(chars):
        c = ord(ch)
        if c < 64:
            lo |= 1 << c
        elif c < 128:
            hi |= 1 << (c - 64)
    return lo, hi


class TokenTable:
    """Per-token properties of one vocabulary, shared by every mask built on it.

    Word structure: `lead` letters continue the word open before the token, `inner` / `inner_min` are the longest /
    shortest complete words inside it, `trail` letters leave a word open, `breaks` says it contains a non-letter,
    `runs` counts its letter runs.  Characters: ASCII bit sets and a flag for non-ASCII characters.
    """

    def __init__(self, vocab: Vocabulary, cache: bool = True):
        self.vocab = vocab
        n = vocab.size
        self.eos = np.zeros(n, dtype=bool)
        self.eos[list(vocab.eos_ids)] = True
        self.text = ~vocab.special  # tokens that stand for text
        arrays = self._load() if cache else None
        if arrays is None:
            arrays = _compute(vocab.strings, self.text)
            if cache:
                self._save(arrays)
        for name in _FIELDS:
            setattr(self, name, arrays[name])

    @classmethod
    def of(cls, vocab: Vocabulary, cache: bool = True) -> TokenTable:
        """The table of `vocab` (computed once per vocabulary; `cache`: also kept on disk)."""
        return vocab.derived(cls, lambda: cls(vocab, cache=cache))

    # -- derived lookups (cheap, built on first use) --------------------------------------------------
    @cached_property
    def empty(self) -> np.ndarray:
        """Text tokens with no text: in a healed view, the tokens that only re-write the prompt's end."""
        return self.text & np.array([not s for s in self.vocab.strings], dtype=bool)

    @cached_property
    def by_string(self) -> dict[str, list[int]]:
        """Token ids by their text (text tokens only)."""
        out: dict[str, list[int]] = {}
        for i, s in enumerate(self.vocab.strings):
            if self.text[i] and s:
                out.setdefault(s, []).append(i)
        return out

    @cached_property
    def _sorted(self) -> tuple[list[str], np.ndarray]:
        return [self.vocab.strings[i] for i in self.sorted_ids.tolist()], self.sorted_ids

    @cached_property
    def _places(self) -> tuple[np.ndarray, np.ndarray]:
        """Per token its place in string order (-1: not a text token), and its length."""
        place = np.full(self.vocab.size, -1, dtype=np.int64)
        place[self.sorted_ids] = np.arange(len(self.sorted_ids))
        return place, np.fromiter(map(len, self.vocab.strings), dtype=np.int64, count=self.vocab.size)

    def prefixes_among(self, ids: np.ndarray) -> np.ndarray:
        """The tokens among `ids` whose text begins the text of another of `ids`, shortest first (in
        sorted order a string's extensions come right after it, so one comparison per token)."""
        place, length = self._places
        places = np.sort(place[ids])
        places = places[places >= 0]
        found = self.sorted_ids[places[:-1][places[1:] < self.prefix_end[places[:-1]]]]
        return found[np.argsort(length[found], kind="stable")]

    def starting_with(self, prefix: str) -> np.ndarray:
        """Ids of the text tokens whose string starts with `prefix`."""
        strings, ids = self._sorted
        lo = bisect.bisect_left(strings, prefix)
        hi = bisect.bisect_left(strings, prefix + "\U0010ffff")
        return ids[lo:hi]

    # -- disk cache -----------------------------------------------------------------------------------
    def _path(self):
        h = hashlib.sha256(f"{_FORMAT}".encode())
        h.update("\x00".join(self.vocab.strings).encode("utf-8", "surrogatepass"))
        h.update(self.vocab.special.tobytes())
        return cache_dir() / "tokens" / f"{h.hexdigest()[:32]}.npz"

    def _load(self) -> dict[str, np.ndarray] | None:
        arrays = load_arrays(self._path(), _FIELDS, "token table")
        if arrays is None or any(len(arrays[name]) != self.vocab.size for name in _PER_TOKEN):
            return None
        return arrays

    def _save(self, arrays: dict[str, np.ndarray]) -> None:
        save_arrays(self._path(), arrays, "token table")


def load_arrays(path, fields: tuple[str, ...], what: str) -> dict[str, np.ndarray] | None:
    """Arrays cached on disk (None if absent or unreadable: they are then computed again)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in fields}
    except (OSError, KeyError, ValueError) as e:
        log.warning("ignoring unreadable %s %s: %s", what, path, e)
        return None


def save_arrays(path, arrays: dict[str, np.ndarray], what: str) -> None:
    """Write arrays next to `path` and rename, so readers never see half a file."""

    try:
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays)
    except OSError as e:  # a read-only cache only costs time
        log.warning("could not cache the %s at %s: %s", what, path, e)
