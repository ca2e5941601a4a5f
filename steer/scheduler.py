"""Drives the particles' `step()` coroutines so that their model calls are batched.

Each particle's step is an ordinary coroutine.  Whenever it needs something expensive (today: next-token
log-probabilities from a language model) it awaits a `Request`, which suspends it.  Once every particle
is either finished or suspended, the scheduler serves all requests of the round in one batched call per
model and resumes everyone.  This makes batching exact and deterministic: no timers, no batch-size
heuristics, and no asyncio event loop.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from typing import Any


class Request:
    """An awaitable that suspends the awaiting particle until the scheduler serves it."""

    def __await__(self):
        result = yield self
        return result


class LogprobsRequest(Request):
    """Bring `context`'s next-token log-probabilities up to date (and score its pending tokens if asked)."""

    __slots__ = ("context", "score")

    def __init__(self, context: Any, score: bool = False):
        self.context = context
        self.score = score


def run_batched(coroutines: Iterable[Coroutine]) -> None:
    """Run coroutines to completion, serving their requests one batched round at a time."""
    waiting: list[tuple[Coroutine, Any]] = [(c, None) for c in coroutines]
    try:
        _drive(waiting)
    except BaseException:
        for coroutine, _ in waiting:  # an error in one particle ends the round: close the others
            coroutine.close()
        raise


def _drive(waiting: list[tuple[Coroutine, Any]]) -> None:
    while waiting:
        requests: list[tuple[Coroutine, Request]] = []
        for coroutine, value in waiting:
            try:
                request = coroutine.send(value)
            except StopIteration:
                continue
            if not isinstance(request, Request):
                coroutine.close()
                raise TypeError(
                    "steer programs may only await steer operations (sample, observe, call, context "
                    f"methods), not {type(request).__name__}"
                )
            requests.append((coroutine, request))
        _serve([r for _, r in requests])
        waiting[:] = [(c, None) for c, _ in requests]


def _serve(requests: list[Request]) -> None:
    by_model: dict[int, tuple[Any, list[LogprobsRequest]]] = {}
    for request in requests:
        if isinstance(request, LogprobsRequest):
            lm = request.context.lm
            by_model.setdefault(id(lm), (lm, []))[1].append(request)
        else:  # pragma: no cover - only LogprobsRequest exists today
            raise TypeError(f"unknown request {request!r}")
    for lm, batch in by_model.values():
        lm.advance(batch)
