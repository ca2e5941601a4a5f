"""Canonical tokenization: which next tokens keep a token sequence the one the tokenizer would produce.

A token sequence is *canonical* when encoding its own text gives it back.  Language models are trained
on canonical sequences only, so they give the others almost no probability (" " then "(" where " (" is
one token sits near e^-15 on Gemma), yet a constrained proposal happily picks them when the constraint
removes the likelier tokens.  Conditioning the target on canonicality removes them from proposal and
target alike (Vieira et al. 2025, "Language Models over Canonical Byte-Pair Encodings").

For BPE the test is local: a sequence is canonical when every token is canonical on its own and every
adjacent pair is.  A pair (a, b) is not canonical when BPE, run on the text of a then b, applies a merge
across the boundary: a merge (l, r) where l lies on a's right spine (the nodes of a's merge tree that
hold its last character) and r on b's left spine, whose rank comes before the merge that consumes l
inside a and the one that consumes r inside b.  Each token's merge tree is found by running BPE on its
own text; the spines are kept as flat arrays, so the allowed set after a token is a few gathers over
the vocabulary (milliseconds), cached per previous token.  Added tokens (Gemma's newline and tab runs,
HTML tags) are matched before BPE, so a pair is also not canonical when one of them spans the boundary.

The tables take some seconds per tokenizer and are cached on disk next to the token tables.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from functools import cached_property

import numpy as np
import torch

from ..files import cache_dir
from ..lm.base import Vocabulary
from .maskops import cleared, pack, unpack
from .tokens import TokenTable, load_arrays, save_arrays

log = logging.getLogger(__name__)

_FORMAT = 2  # bump when the tables change
_NONE = np.iinfo(np.int32).max  # "no merge": later than every rank
_FIELDS = ("alone", "merge_left", "merge_right", "merge_rank") + tuple(
    f"{side}_{part}" for side in ("left", "right") for part in ("tok", "node", "consumed", "created", "ptr"))


def _bpe_model(tokenizer) -> dict | None:
    """The tokenizer's BPE model (pieces, merges) from its backend JSON; None for other kinds."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except (AttributeError, ValueError):
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return {"vocab": model["vocab"], "merges": merges, "added": spec.get("added_tokens") or []}


def _merge_trees(pieces: dict[str, int], merges: list[tuple[str, str]], size: int):
    """Run BPE on every piece on its own: whether it comes back as itself, and its two spines.

    A spine is the chain of tree nodes holding the token's first (left) or last (right) character,
    from the root down, each with the rank of the merge that consumes it inside the token.
    """
    rank: dict[tuple[str, str], int] = {}
    for r, pair in enumerate(merges):
        rank.setdefault(pair, r)
    alone = np.zeros(size, dtype=bool)
    left: list[list[tuple[int, int]]] = [[] for _ in range(size)]
    right: list[list[tuple[int, int]]] = [[] for _ in range(size)]
    for piece, tid in pieces.items():
        if tid >= size:
            continue
        if any(ch not in pieces for ch in piece):
            continue  # byte fallback: not a text piece BPE builds
        # symbols: (text, created rank, left child index, right child index) in a node list
        nodes = [(ch, -1, -1, -1) for ch in piece]
        syms = list(range(len(piece)))
        while len(syms) > 1:
            best, at = _NONE, -1
            for i in range(len(syms) - 1):
                r = rank.get((nodes[syms[i]][0], nodes[syms[i + 1]][0]), _NONE)
                if r < best:
                    best, at = r, i
            if at < 0:
                break
            a, b = syms[at], syms[at + 1]
            nodes.append((nodes[a][0] + nodes[b][0], best, a, b))
            syms[at:at + 2] = [len(nodes) - 1]
        if len(syms) != 1 or nodes[syms[0]][0] != piece:
            continue
        alone[tid] = True
        for side, out in ((2, left), (3, right)):
            chain, node, consumed = [], syms[0], _NONE
            while True:
                text, created, lc, rc = nodes[node]
                nid = pieces.get(text)
                if nid is not None:
                    chain.append((nid, consumed))
                child = lc if side == 2 else rc
                if child < 0:
                    break
                node, consumed = child, created
            out[tid] = chain
    return rank, alone, left, right


def _grouped(key: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The order that sorts `key` (values 0..n-1), and where each value's run starts in that order."""
    order = np.argsort(key, kind="stable")
    return order, np.searchsorted(key[order], np.arange(n + 1))


def _flat(side: str, spines: list[list[tuple[int, int]]]) -> dict[str, np.ndarray]:
    """Spines as flat arrays: owner token, node, rank consuming the node, rank creating it (-1: a
    character), and per token the start of its entries."""
    lengths = [len(s) for s in spines]
    created = [s[k + 1][1] if k + 1 < len(s) else -1 for s in spines for k in range(len(s))]
    return {
        f"{side}_tok": np.repeat(np.arange(len(spines), dtype=np.int32), lengths),
        f"{side}_node": np.array([n for s in spines for n, _ in s], dtype=np.int32),
        f"{side}_consumed": np.array([r for s in spines for _, r in s], dtype=np.int32),
        f"{side}_created": np.array(created, dtype=np.int32),
        f"{side}_ptr": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }


class Canonical:
    """Canonical next tokens after a token (`after`) and before one (`before`), for one vocabulary.

    Tokens that are not text (special, control) are left alone: other filters govern them.  A tokenizer
    that is not BPE (e.g. a character-level one) makes every sequence of its pieces canonical.
    """

    def __init__(self, vocab: Vocabulary, cache: bool = True):
        self.vocab = vocab
        n = vocab.size
        tokenizer = vocab.tokenizer
        self.bpe = _bpe_model(tokenizer) if tokenizer is not None else None
        # Per instance, so that a vocabulary's tables go with it.
        # `after` masks are 1 byte a token: a few are kept whole, more packed (1 bit a token), many
        # more as what they leave out
        self.after = functools.lru_cache(maxsize=64)(self._after_of)
        self.after_words = functools.lru_cache(maxsize=512)(self._after_words)
        self._left_out_after = functools.lru_cache(maxsize=4096)(self._left_out)
        self.before = functools.lru_cache(maxsize=512)(self._before)
        self.exempt = vocab.special.copy()  # not judged: special tokens, EOS
        self.exempt[list(vocab.eos_ids)] = True
        self._added_splits: dict[str, list[str]] = {}  # an added token's head -> the rests that finish it
        self._longest_head = 0
        if self.bpe is None:
            self.alone = np.ones(n, dtype=bool)
            self.arrays = None
            return
        arrays = self._load() if cache else None
        if arrays is None:
            arrays = self._compute(tokenizer)
            if cache:
                self._save(arrays)
        self.arrays = arrays
        self.alone = arrays["alone"] | self.exempt
        self._alone_words = pack(self.alone)
        self._judged = self.alone & ~self.exempt  # what a token may leave out after it
        for added in self.bpe["added"]:
            content = added.get("content", "")
            if not added.get("special") and len(content) > 1:
                for k in range(1, len(content)):
                    self._added_splits.setdefault(content[:k], []).append(content[k:])
        self._longest_head = max(map(len, self._added_splits), default=0)
        self._merges = {}  # per side of a boundary: merges grouped by the operand on that side
        for side, mine, theirs in (("right", "merge_left", "merge_right"), ("left", "merge_right", "merge_left")):
            order, ptr = _grouped(arrays[mine], n)
            self._merges[side] = ptr, arrays[theirs][order], arrays["merge_rank"][order]
        # per side, the spine entries grouped by node (each node's entries contiguous, so that the
        # conflict search reads runs of memory instead of gathering across the whole table)
        self._by_node = {}
        for side in ("left", "right"):
            order, node_ptr = _grouped(arrays[f"{side}_node"], n)
            self._by_node[side] = (node_ptr, *(arrays[f"{side}_{k}"][order] for k in ("tok", "consumed", "created")))

    @classmethod
    def of(cls, vocab: Vocabulary) -> Canonical:
        return vocab.derived(cls, lambda: cls(vocab))

    @property
    def trivial(self) -> bool:
        """True when every pair is canonical (no BPE merges to cross a boundary)."""
        return self.arrays is None

    # -- tables ---------------------------------------------------------------------------------------
    def _compute(self, tokenizer) -> dict[str, np.ndarray]:
        n = self.vocab.size
        pieces = {p: i for p, i in self.bpe["vocab"].items() if i < n}
        rank, simulated, left, right = _merge_trees(pieces, self.bpe["merges"], n)
        # The tokenizer itself has the last word on single tokens (added tokens are matched before
        # BPE, so e.g. a BPE piece holding a newline is never produced).
        added = {a["id"] for a in self.bpe["added"] if a["id"] < n}
        ids = [i for i in range(n) if simulated[i] or i in added]  # added tokens are matched whole
        texts = [self.vocab.strings[i] for i in ids]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        alone = np.zeros(n, dtype=bool)
        for i, enc in zip(ids, encoded):
            alone[i] = enc == [i]
        for i in added:  # matched whole, before BPE: no spines
            left[i] = right[i] = []
        for i in range(n):
            if not alone[i]:
                left[i] = right[i] = []
        triples = [(pieces[a], pieces[b], r) for (a, b), r in rank.items() if a in pieces and b in pieces]
        m = np.array(triples, dtype=np.int64).reshape(-1, 3)
        return {"alone": alone, **_flat("left", left), **_flat("right", right),
                "merge_left": m[:, 0].astype(np.int32), "merge_right": m[:, 1].astype(np.int32),
                "merge_rank": m[:, 2].astype(np.int32)}

    def _conflicts(self, token: int, side: str) -> np.ndarray:
        """Tokens on the other side of `token` (whose `side` spine meets them) that some boundary merge
        would join to it: a merge of a node of each spine, ranked after both nodes exist and before
        either is consumed inside its own token."""
        a = self.arrays
        other = "left" if side == "right" else "right"
        lo, hi = a[f"{side}_ptr"][token], a[f"{side}_ptr"][token + 1]
        nodes, consumed, created = (a[f"{side}_{k}"][lo:hi] for k in ("node", "consumed", "created"))
        node_ptr, o_tok, o_consumed, o_created = self._by_node[other]
        ptr, partner, prank = self._merges[side]
        bad = np.zeros(self.vocab.size, dtype=bool)
        for node, used, made in zip(nodes, consumed, created):
            p_lo, p_hi = ptr[node], ptr[node + 1]
            if p_lo == p_hi:
                continue
            c = prank[p_lo:p_hi]
            keep = (c < used) if side == "right" else (c <= used)
            keep &= c > made
            if not keep.any():
                continue
            others, c = partner[p_lo:p_hi][keep], c[keep]
            # every spine entry on the other side whose node is one of `others` (a ragged gather)
            starts, lengths = node_ptr[others], node_ptr[others + 1] - node_ptr[others]
            if not lengths.sum():
                continue
            offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
            entries = offsets + np.arange(lengths.sum())
            c = np.repeat(c, lengths)
            # Equal ranks are the same merge, applied left to right: the boundary merge comes before
            # the one inside the right-hand token and after the one inside the left-hand token.
            hit = (c <= o_consumed[entries]) if side == "right" else (c < o_consumed[entries])
            hit &= c > o_created[entries]
            bad[o_tok[entries[hit]]] = True
        return bad

    # -- queries (`after` and `before` are these, cached per token) ------------------------------------
    def _after_of(self, prev: int) -> torch.Tensor:
        return torch.from_numpy(unpack(self.after_words(prev), self.vocab.size))

    def _after_words(self, prev: int) -> np.ndarray:
        """`after(prev)` packed 32 tokens per int32 word, as llguidance packs its masks."""
        if self.arrays is None:
            return pack(np.ones(self.vocab.size, dtype=bool))
        left_out = self._left_out_after(prev)
        if left_out.dtype == np.uint32:  # packed: many left out
            return self._alone_words & ~left_out.view(np.int32)
        return cleared(self._alone_words, left_out)

    def _left_out(self, prev: int) -> np.ndarray:
        """The tokens standing alone that may not follow `prev` (`prev` itself is not judged: a prompt
        may hold any tokens): their sorted ids (int32), or packed words (uint32) when many (at most 1
        bit a token: computing this takes about half a millisecond, keeping it costs little)."""
        if self.arrays is None or self.exempt[prev]:
            return np.zeros(0, dtype=np.int32)
        bad = self._conflicts(prev, "right")
        s = self.vocab.strings[prev]
        table = TokenTable.of(self.vocab)
        for k in range(1, min(len(s), self._longest_head) + 1):
            for rest in self._added_splits.get(s[-k:], ()):  # an added token is matched whole across the boundary
                bad[table.starting_with(rest)] = True
        bad &= self._judged
        ids = np.flatnonzero(bad)
        return ids.astype(np.int32) if len(ids) * 32 < len(bad) else pack(bad).view(np.uint32)

    def _before(self, nxt: int) -> np.ndarray:
        """Bool array over the vocabulary: tokens after which `nxt` keeps the sequence canonical."""
        ok = self.alone.copy() if self.alone[nxt] else np.zeros(self.vocab.size, dtype=bool)
        if self.arrays is not None and self.alone[nxt] and not self.exempt[nxt]:
            ok &= ~self._conflicts(nxt, "left")
            s = self.vocab.strings[nxt]
            for head, rests in self._added_splits.items():
                if any(s.startswith(rest) for rest in rests):
                    ok[self._ending_with(head)] = False
            ok |= self.exempt
        return ok

    def follows(self, prev: int, nxt: int) -> bool:
        """Whether `nxt` may follow `prev` canonically, read from the sparse table of what `prev` leaves
        out (no vocabulary-wide mask is built: the look-ahead asks this of a few probes per candidate)."""
        if not self.alone[nxt]:
            return False
        left_out = self._left_out_after(prev)
        if left_out.dtype == np.uint32:  # packed words
            return not (int(left_out[nxt >> 5]) >> (nxt & 31)) & 1
        at = int(np.searchsorted(left_out, nxt))
        return not (at < len(left_out) and left_out[at] == nxt)

    def pair(self, a: int, b: int) -> bool:
        """(a, b) is canonical: both tokens on their own, and no merge across the boundary."""
        return bool(self.alone[a] and self.after(a)[b])

    def is_canonical(self, ids: list[int]) -> bool:
        """Every token canonical on its own and every adjacent pair canonical."""
        return all(self.alone[i] for i in ids) and all(self.pair(a, b) for a, b in zip(ids, ids[1:]))

    @cached_property
    def _reversed(self) -> tuple[list[str], np.ndarray]:
        strings = self.vocab.strings
        order = sorted((s[::-1], i) for i, s in enumerate(strings) if s and not self.exempt[i])
        return [s for s, _ in order], np.array([i for _, i in order], dtype=np.int64)

    def _ending_with(self, suffix: str) -> np.ndarray:
        import bisect

        keys, ids = self._reversed
        key = suffix[::-1]
        return ids[bisect.bisect_left(keys, key):bisect.bisect_left(keys, key + "\U0010ffff")]

    # -- disk cache -----------------------------------------------------------------------------------
    def _path(self):
        h = hashlib.sha256(f"canonical{_FORMAT}".encode())
        h.update("\x00".join(self.vocab.strings).encode("utf-8", "surrogatepass"))
        h.update(hashlib.sha256("\n".join(" ".join(m) for m in self.bpe["merges"]).encode(
            "utf-8", "surrogatepass")).digest())
        return cache_dir() / "tokens" / f"canonical-{h.hexdigest()[:32]}.npz"

    def _load(self) -> dict[str, np.ndarray] | None:

        arrays = load_arrays(self._path(), _FIELDS, "canonical-tokenization table")
        return arrays if arrays is not None and len(arrays["alone"]) == self.vocab.size else None

    def _save(self, arrays: dict[str, np.ndarray]) -> None:

        save_arrays(self._path(), arrays, "canonical-tokenization table")
