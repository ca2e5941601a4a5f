"""Masks over the vocabulary, as bools and packed 32 tokens per int32 word.

Boolean masks are combined through NumPy: on a 262k-token vocabulary torch's `&`, `|` and `~` on bool
tensors take about half a millisecond each, NumPy's (on the same memory, no copy) about ten
microseconds.  Packed masks are the form llguidance writes (token i is bit i % 32 of word i // 32):
combining them takes a microsecond or two, so a step's restrictions are intersected packed and
unpacked once.  A leaf module: it imports nothing of steer.
"""

from __future__ import annotations

import numpy as np
import torch


def both(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.logical_and(a.numpy(), b.numpy()))


def either(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.logical_or(a.numpy(), b.numpy()))


def negate(a: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.logical_not(a.numpy()))


def pack(ok: np.ndarray) -> np.ndarray:
    """Bools as int32 words (the tail of the last word is zero)."""
    words = np.zeros(-(-len(ok) // 32) * 4, dtype=np.uint8)
    packed = np.packbits(ok, bitorder="little")
    words[:len(packed)] = packed
    return words.view(np.int32)


def unpack(words: np.ndarray, size: int) -> np.ndarray:
    """Packed words as a fresh bool array of `size` entries."""
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:size].view(bool)


def bits_at(words: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether each of `ids` is set in `words`."""
    ids = np.asarray(ids, dtype=np.int64)
    return ((words.view(np.uint32)[ids >> 5] >> (ids & 31).astype(np.uint32)) & 1).astype(bool)


def cleared(words: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """A copy of `words` with the bits of the sorted `ids` cleared."""
    out = words.copy()
    if len(ids):
        ids = np.asarray(ids, dtype=np.int64)
        at = ids >> 5
        starts = np.flatnonzero(np.concatenate([[True], at[1:] != at[:-1]]))
        bits = np.left_shift(np.uint32(1), (ids & 31).astype(np.uint32))
        out.view(np.uint32)[at[starts]] &= ~np.bitwise_or.reduceat(bits, starts)
    return out


def few_ids(words: np.ndarray, limit: int) -> np.ndarray | None:
    """The ids set in packed `words` when there are at most `limit` of them (None: more), counted
    first without unpacking (more set words than `limit` end it at once, else the bits are counted)."""
    if np.count_nonzero(words) > limit:  # (a wide mask: counting words is one fast pass)
        return None
    set_words = words != 0  # NumPy finds non-zero bools several times faster than int32s
    nonzero = set_words.nonzero()[0]
    if len(nonzero) <= _FEW_WORDS:  # a forced or narrow choice: its bits, read one by one
        ids = []
        for at, word in zip(nonzero.tolist(), words[nonzero].view(np.uint32).tolist()):
            at *= 32
            while word:
                low = word & -word
                ids.append(at + low.bit_length() - 1)
                word ^= low
        return np.array(ids, dtype=np.int64) if len(ids) <= limit else None
    found = words[nonzero]
    if len(found) * 32 > limit and int(np.bitwise_count(found.view(np.uint32)).sum()) > limit:
        return None
    bits = np.unpackbits(found.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    rows, cols = bits.view(bool).nonzero()
    return nonzero[rows] * 32 + cols


_FEW_WORDS = 4  # up to this many set words, bits are read in Python (faster than NumPy's set-up)
