"""The bounds every value of a `.steer` program stays within, checked in one place: literals when the
program is parsed, and the result of every operator and built-in when it runs."""

from __future__ import annotations

import contextvars
import math
import re
from typing import Any

MAX_LENGTH = 1_000_000  # longest string or list a program may build
MAX_SIZE = 10_000_000  # characters and items of a value in all, nested lists included
MAX_INT = 2**63  # integers stay strictly within ±MAX_INT

_SURROGATE = re.compile("[\ud800-\udfff]")


def first_surrogate(s: str) -> str | None:
    """The first lone surrogate code point in `s` (not a character: it cannot be encoded), if any."""
    found = _SURROGATE.search(s)
    return found.group() if found else None


def scalar_problem(value: Any) -> str | None:
    """Why a number or string is out of bounds (None: it is not)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if abs(value) < MAX_INT else "integer beyond ±2**63"
    if isinstance(value, float):
        return None if math.isfinite(value) else "the result is not a finite number"
    if isinstance(value, str):
        if len(value) > MAX_LENGTH:
            return f"result would hold {len(value):,} characters; the limit is {MAX_LENGTH:,}"
        bad = first_surrogate(value)
        if bad is not None:
            return f"the result holds \\u{ord(bad):04x}, half of a surrogate pair, not a character"
    return None


MAX_WORK = 50_000_000  # characters and items one particle may build in all, copies included
_WORK: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("steer_work", default=None)


def count_work_for(counter: list[int]) -> None:
    """Charge what is built from now on (in this task) to `counter`, one particle's running total."""
    _WORK.set(counter)


def work_problem(built: int) -> str | None:
    """Charge `built` characters and items to the running particle; why it must stop (None: it may go
    on).  Statements are counted too, but one statement can copy a million items: `l = l + [i]` in a
    loop is quadratic, and this is what stops it."""
    counter = _WORK.get()
    if counter is None:
        return None
    counter[0] += built
    if counter[0] > MAX_WORK:
        return (f"the program built more than {MAX_WORK:,} characters and items in all (copies included; "
                "`l = l + [x]` in a loop copies l every time)")
    return None
