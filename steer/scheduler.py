"""Drives the particles' `step()` coroutines so that their model calls are batched.

Each particle's step is an ordinary coroutine.  Whenever it needs something expensive (next-token
log-probabilities from a language model, a reward model's score) it awaits a `Request`, which suspends
it.  Once every particle is either finished or suspended, the scheduler serves all requests of the round
in one batched call per server (model) and resumes everyone.  This makes batching exact and deterministic: no timers, no batch-size
heuristics, and no asyncio event loop.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from typing import Any


class Request:
    """An awaitable that suspends the awaiting particle until the scheduler serves it.

    `server` is the object whose `serve(requests)` answers a whole round's requests for it at once,
    setting each request's `result`.
    """

    result: Any = None

    def __await__(self):
        yield self
        return self.result

    @property
    def server(self) -> Any:
        raise NotImplementedError


class LogprobsRequest(Request):
    """Bring `context`'s next-token log-probabilities up to date and, with `score=k`, also return the
    log-probability of each of its last k tokens given those before it (in `context.pending_scores`)."""

    __slots__ = ("context", "score")

    def __init__(self, context: Any, score: int = 0):
        self.context = context
        self.score = score

    @property
    def server(self) -> Any:
        return self.context.lm


class AllOf(Request):
    """Several requests awaited together, served in the same round (e.g. one per context of a
    mixture); the result is the list of their results."""

    def __init__(self, requests: Iterable[Request]):
        self.requests = list(requests)

    @property
    def result(self) -> list[Any]:
        return [r.result for r in self.requests]


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
    by_server: dict[int, tuple[Any, list[Request]]] = {}
    flat = [part for r in requests for part in (r.requests if isinstance(r, AllOf) else [r])]
    for request in flat:
        server = request.server
        by_server.setdefault(id(server), (server, []))[1].append(request)
    for server, batch in by_server.values():
        server.serve(batch)
