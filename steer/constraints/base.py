"""The one protocol every constraint speaks: what the samplers ask of masks, checks and tilts.

A `Constraint` answers three questions about the next token of a context:

- `allowed_in(context)`: the tokens that may come next, a bool tensor over the vocabulary (None: every
  token).  For a checked constraint this is an over-approximation: a necessary condition, cheap to
  compute for the whole vocabulary (a regular approximation's mask, or nothing).
- `token_check(context)`: a test of one drawn token that the mask cannot afford to make for every
  token (None: the mask says everything).  The exact check of a non-regular pattern or a grammar, or a
  budget check (the text can still end in time after the token).  Samplers apply it by adaptive
  weighted rejection sampling within the mask, so samples stay exact and weights unbiased.
  `NOTHING_FITS` says no token can pass.
- `tilt(context)`: log-weights φ over the vocabulary, a soft preference (None: none).

`exact` says the mask is the whole constraint up to a budget check, so "the next token is not in it"
is meaningful (`~c`, observing `ctx.allowed(c)` as False).  Constraints combine with `&` (masks
intersect, checks must all pass, tilts add); `|` and `~` apply to exact masks without tilts.

Per-particle state (a grammar matcher) lives in the context's `constraint_states`, which a copy made
by resampling shares until one of them moves (copy-on-write): a constraint object itself is an
immutable spec that every particle shares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..errors import SteerError
from ..lm.base import LanguageModel
from .maskops import both

TokenTest = Callable[[int], bool]


def NOTHING_FITS(token: int) -> bool:
    """The check of a state in which no next token can pass (a text that cannot end in its budget)."""
    return False


class Context(Protocol):
    """What a constraint may read of the context it judges (`steer.context.LMContext` provides it)."""

    lm: LanguageModel
    tokens: list[int]
    prompt_length: int
    serial: int
    canonical: bool
    allow_special: bool
    end: tuple[str, ...]
    end_at: int | None
    healed: str
    constraint_states: dict[object, Any]

    @property
    def text(self) -> str: ...
    @property
    def heal(self) -> str: ...
    @property
    def ended(self) -> bool: ...
    @property
    def tokens_left(self) -> int | None: ...
    @property
    def generated(self) -> list[int]: ...
    @property
    def written(self) -> int: ...
    def end_position(self, text: str, new: str) -> int | None: ...


class Constraint:
    """Anything that shapes the next token (see the module's docstring for the three questions)."""

    exact = True  # the mask is the whole constraint (up to a budget check): its complement means something

    def __deepcopy__(self, memo):  # an immutable spec with shareable caches: particles share it
        return self

    def allowed_in(self, context: Context) -> torch.Tensor | None:
        """The tokens that may come next (None: every token)."""
        return None

    def token_check(self, context: Context) -> TokenTest | None:
        """A test of a drawn next token beyond the mask (None: none; `NOTHING_FITS`: none passes)."""
        return None

    def tilt(self, context: Context) -> torch.Tensor | None:
        """Log-weights over the next token, float64 (None: no preference)."""
        return None

    @property
    def restricts(self) -> bool:
        """Whether the constraint may leave tokens out (a pure tilt does not)."""
        return True

    def __and__(self, other: Any) -> Constraint:
        if not isinstance(other, Constraint):
            return NotImplemented
        return AllOf(self, other)

    __rand__ = __and__

    def __or__(self, other: Any) -> Constraint:
        raise SteerError(f"only masks combine with `or`: {self!r} | {other!r}")

    __ror__ = __or__

    def __invert__(self) -> Constraint:
        raise SteerError(f"{self!r} is checked token by token and cannot be negated")


class AllOf(Constraint):
    """Several constraints at once: masks intersect, every check must pass, tilts add up."""

    def __init__(self, *parts: Constraint):
        flat: list[Constraint] = []
        for part in parts:
            flat.extend(part.parts if isinstance(part, AllOf) else [part])
        self.parts = tuple(flat)
        self.exact = all(p.exact for p in self.parts)

    @property
    def restricts(self) -> bool:
        return any(p.restricts for p in self.parts)

    def allowed_in(self, context: Context) -> torch.Tensor | None:
        masks = [m for m in (p.allowed_in(context) for p in self.parts) if m is not None]
        mask = masks[0] if masks else None
        for m in masks[1:]:
            mask = both(mask, m)
        return mask

    def token_check(self, context: Context) -> TokenTest | None:
        return all_of([p.token_check(context) for p in self.parts])

    def tilt(self, context: Context) -> torch.Tensor | None:
        tilts = [t for t in (p.tilt(context) for p in self.parts) if t is not None]
        return sum(tilts[1:], tilts[0]) if tilts else None

    def __repr__(self) -> str:
        return "(" + " & ".join(repr(p) for p in self.parts) + ")"


def all_of(checks: list[TokenTest | None]) -> TokenTest | None:
    """One check that passes when every given check does (None when none is given)."""
    found = [c for c in checks if c is not None]
    if NOTHING_FITS in found:
        return NOTHING_FITS
    if len(found) <= 1:
        return found[0] if found else None

    def every(token: int) -> bool:
        return all(check(token) for check in found)

    named = [c.candidates for c in found if hasattr(c, "candidates")]
    if named:  # the tokens a check names as likely to pass (see `checks.awrs`), of every such check
        every.candidates = lambda: sorted({i for candidates in named for i in candidates()})
    return every


class FixedMask(Constraint):
    """A mask given directly: a bool tensor over the vocabulary, token ids, or `context -> either`."""

    def __init__(self, spec: Any):
        self.spec = spec

    def allowed_in(self, context: Context) -> torch.Tensor:
        spec = self.spec(context) if callable(self.spec) else self.spec
        size = context.lm.vocab.size
        if isinstance(spec, torch.Tensor):
            if spec.dtype != torch.bool or spec.shape != (size,):
                raise SteerError(f"a mask tensor must be bool of shape ({size},)")
            return spec
        try:
            ids = list(spec)
        except TypeError:
            raise SteerError(f"cannot use {type(spec).__name__} as a token mask") from None
        mask = torch.zeros(size, dtype=torch.bool)
        mask[ids] = True
        return mask

    def __invert__(self) -> Constraint:
        return FixedMask(lambda context: ~self.allowed_in(context))

    def __repr__(self) -> str:
        return "the mask" if isinstance(self.spec, torch.Tensor) else f"mask({self.spec!r})"


def as_constraint(spec: Any) -> Constraint | None:
    """A constraint from what users may pass as one: a `Constraint`, a bool tensor, token ids, or a
    function of the context returning either (None stays None)."""
    if spec is None or isinstance(spec, Constraint):
        return spec
    if isinstance(spec, (str, bytes)):
        raise SteerError(f"cannot use the string {spec!r} as a token mask (use steer.masks or steer.patterns)")
    if isinstance(spec, torch.Tensor) or callable(spec) or hasattr(spec, "__iter__"):
        return FixedMask(spec)
    raise SteerError(f"cannot use {type(spec).__name__} as a constraint (a mask, a check or a tilt)")
