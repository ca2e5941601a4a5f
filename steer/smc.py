"""Samplers: SMC with resampling, SMC-steer (without replacement), and importance sampling.

Weights are kept in log space and *unnormalised*: after resampling every particle carries the mean
weight of the population, so at any time logmeanexp(weights) estimates the log normalising constant of
the current target, and at the end it is `log_ml`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import randomness
from .errors import ParticlesDiedError, SteerError
from .program import Program, clone
from .report import write_html
from .resampling import check_scheme, resample, without_replacement
from .scheduler import run_batched

log = logging.getLogger(__name__)
NEG_INF = float("-inf")
METHODS = ("smc", "smc-steer", "is")


def _logsumexp(x: np.ndarray) -> float:
    top = np.max(x)
    if top == NEG_INF:
        return NEG_INF
    return float(top + np.log(np.sum(np.exp(x - top))))


def _normalise(log_weights: np.ndarray) -> np.ndarray:
    return np.exp(log_weights - _logsumexp(log_weights))


def effective_sample_size(log_weights: Sequence[float]) -> float:
    w = _normalise(np.asarray(log_weights, dtype=float))
    return float(1.0 / np.sum(w * w))


@dataclass
class StepRecord:
    """What happened in one SMC step (weights are taken after stepping, before resampling)."""

    step: int
    log_weights: list[float]
    ess: float
    live: int
    resampled: bool
    ancestors: list[int] | None
    log_ml: float  # running estimate of the log normalising constant
    seconds: float
    particles: list[str] | None = None


@dataclass
class Posterior:
    """The weighted particles a sampler returns."""

    particles: list[Program]
    log_weights: np.ndarray
    log_ml: float
    trace: list[StepRecord]
    method: str
    seed: int | None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> np.ndarray:
        """Normalised weights, in the order of `particles`."""
        return _normalise(self.log_weights)

    @property
    def ess(self) -> float:
        return effective_sample_size(self.log_weights)

    def distribution(self) -> dict[Any, float]:
        """Posterior probability of each distinct result, most probable first."""
        totals: dict[Any, float] = {}
        for particle, w in zip(self.particles, self.weights):
            if w == 0.0:
                continue
            key = particle.result()
            totals[key] = totals.get(key, 0.0) + float(w)
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    def top(self, k: int = 1) -> list[tuple[Any, float]]:
        return list(self.distribution().items())[:k]

    def sample(self, rng: np.random.Generator | None = None) -> Program:
        rng = rng or np.random.default_rng()
        return self.particles[int(rng.choice(len(self.particles), p=self.weights))]

    def kl_to_base(self, log_potentials: Sequence[float]) -> float:
        """KL(target || base) for a program whose target is base(x) exp(φ(x)) / Z: E_target[φ] - log Z,
        from the weights, φ of each final particle (`log_potentials`, in the order of `particles`) and
        log_ml.  Exact for the base the program's weights are relative to (with healing or canonical
        tokenization on, the base restricted that way).  How far a steered distribution moved from the
        model, as the KL of a policy trained towards the same target (DPO) is measured."""
        phi = np.asarray(log_potentials, dtype=float)
        if phi.shape != (len(self.particles),):
            raise SteerError(f"kl_to_base needs one log-potential per particle ({len(self.particles)}), got {phi.shape}")
        w = self.weights
        return float(np.dot(w[w > 0], phi[w > 0]) - self.log_ml)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "particles": len(self.particles),
            "log_ml": self.log_ml,
            "ess": self.ess,
            "steps": len(self.trace),
            "resampled": sum(r.resampled for r in self.trace),
            "seconds": round(self.seconds, 3),
            "seed": self.seed,
            **self.info,
        }

    def write_html(self, path: str | Path, title: str = "steer run") -> Path:
        """A self-contained HTML page of this run (see `steer.report`); record the particles' texts with
        `record_particles=True`."""
        return write_html(self, path, title)

class _Run:
    """Bookkeeping shared by all samplers: stepping, death checks, tracing, finishing."""

    def __init__(self, program: Program, n: int, seed: int | None, max_steps: int,
                 record_particles: bool, progress: bool, method: str):
        if not isinstance(program, Program):
            raise SteerError(f"expected a steer.Program, got {type(program).__name__}")
        if n < 1:
            raise SteerError(f"the number of particles must be at least 1, got {n}")
        if max_steps < 1:
            raise SteerError(f"max_steps must be at least 1, got {max_steps}")
        randomness.seed(seed)
        self.rng = randomness.streams.numpy
        self.seed, self.max_steps, self.method = seed, max_steps, method
        self.record_particles = record_particles
        self.trace: list[StepRecord] = []
        self.started = time.perf_counter()
        self.bar = tqdm(total=None, desc=method, unit="step", disable=not progress, leave=False)
        self.particles = [clone(program) for _ in range(n)]

    def step(self, particles: list[Program]) -> None:
        """One SMC step of every unfinished particle, batched."""
        t = len(self.trace) + 1
        if t > self.max_steps:
            raise SteerError(f"particles were still running after max_steps={self.max_steps} steps")
        run_batched([p._advance() for p in particles if not p.finished])
        for p in particles:
            if p.finished:
                p._release()
        if all(p.weight == NEG_INF for p in particles):
            reasons = [p.death_reason for p in particles if p.death_reason]
            raise ParticlesDiedError(t, reasons[-1] if reasons else None)

    def record(self, particles: list[Program], resampled: bool, ancestors, ess: float, start: float,
               log_ml: float) -> None:
        self.trace.append(StepRecord(
            step=len(self.trace) + 1,
            log_weights=[p.weight for p in particles],
            ess=ess,
            live=sum(not p.finished for p in particles),
            resampled=resampled,
            ancestors=None if ancestors is None else [int(a) for a in ancestors],
            log_ml=log_ml,
            seconds=time.perf_counter() - start,
            particles=[str(p) for p in particles] if self.record_particles else None,
        ))
        self.bar.update(1)
        self.bar.set_postfix(ess=f"{ess:.1f}", live=self.trace[-1].live)

    def done(self, particles: list[Program], **info: Any) -> Posterior:
        self.bar.close()
        for p in particles:
            p._release()
        log_w = np.array([p.weight for p in particles], dtype=float)
        return Posterior(particles, log_w, _logsumexp(log_w) - math.log(len(log_w)), self.trace,
                         self.method, self.seed, time.perf_counter() - self.started, info)


def smc(program: Program, particles: int = 16, *, ess_threshold: float = 0.5,
        resampling: str = "systematic", seed: int | None = None, max_steps: int = 100_000,
        record_particles: bool = False, progress: bool = False) -> Posterior:
    """Sequential Monte Carlo: step all particles, resample when ESS < ess_threshold * N.

    `ess_threshold=1` resamples every step; `0` never does (importance sampling).
    """
    check_scheme(resampling)
    if not 0.0 <= ess_threshold <= 1.0:
        raise SteerError(f"ess_threshold must lie in [0, 1], got {ess_threshold}")
    method = "smc" if ess_threshold > 0 else "is"
    run = _Run(program, particles, seed, max_steps, record_particles, progress, method)
    population = run.particles
    n = len(population)
    while not all(p.finished for p in population):
        start = time.perf_counter()
        run.step(population)
        log_w = np.array([p.weight for p in population])
        ess = effective_sample_size(log_w)
        log_ml = _logsumexp(log_w) - math.log(n)
        resampled = ess < ess_threshold * n and not all(p.finished for p in population)
        ancestors = resample(_normalise(log_w), n, resampling, run.rng) if resampled else None
        run.record(population, resampled, ancestors, ess, start, log_ml)
        if resampled:
            population = _offspring(population, ancestors)
            for p in population:
                p.weight = log_ml
    if method == "is":
        return run.done(population)
    return run.done(population, resampling=resampling, ess_threshold=ess_threshold)


def importance_sampling(program: Program, particles: int = 16, *, seed: int | None = None,
                        max_steps: int = 100_000, record_particles: bool = False,
                        progress: bool = False) -> Posterior:
    """Run every particle to the end independently and weigh them (SMC that never resamples)."""
    return smc(program, particles, ess_threshold=0.0, seed=seed, max_steps=max_steps,
               record_particles=record_particles, progress=progress)


def smc_steer(program: Program, particles: int = 16, *, beam: int = 3, seed: int | None = None,
              max_steps: int = 100_000, record_particles: bool = False,
              progress: bool = False) -> Posterior:
    """SMC-steer (Lew et al. 2023): each live particle is extended `beam` times, then N survivors are
    chosen without replacement (Fearnhead-Clifford), so no two survivors are copies of one another."""
    if beam < 1:
        raise SteerError(f"beam must be at least 1, got {beam}")
    run = _Run(program, particles, seed, max_steps, record_particles, progress, "smc-steer")
    population = run.particles
    n = len(population)
    while not all(p.finished for p in population):
        start = time.perf_counter()
        m = len(population)
        total = sum(1 if p.finished else beam for p in population)
        # Expand: each live particle becomes `beam` children sharing its weight, scaled so that the
        # children's mean weight equals the parents'.
        children: list[Program] = []
        for p in population:
            children.append(p)
            p.weight += math.log(total / m) - (0.0 if p.finished else math.log(beam))
            if not p.finished:
                children.extend(clone(p) for _ in range(beam - 1))
        run.step(children)
        log_w = np.array([c.weight for c in children])
        kept, drawn, log_c = without_replacement(log_w, n, run.rng)
        survivors = np.concatenate([kept, drawn]).astype(int)
        # Survivors' mean weight is an unbiased estimate of the children's mean weight.
        scale = math.log(len(survivors) / total)
        for i in kept:
            children[i].weight += scale
        for i in drawn:
            children[i].weight = _logsumexp(log_w) - log_c + scale
        population = [children[i] for i in survivors]
        pop_w = np.array([p.weight for p in population])
        run.record(population, True, survivors, effective_sample_size(pop_w), start,
                   _logsumexp(pop_w) - math.log(len(population)))
    return run.done(population, beam=beam)


def _offspring(population: list[Program], ancestors: np.ndarray) -> list[Program]:
    """New population from ancestor indices; the first copy of each ancestor reuses the object."""
    used: set[int] = set()
    out = []
    for a in ancestors:
        a = int(a)
        out.append(clone(population[a]) if a in used else population[a])
        used.add(a)
    return out


def run(program: Program, method: str = "smc", **options: Any) -> Posterior:
    """Run `program` with the named sampler ("smc", "smc-steer" or "is")."""
    samplers = {"smc": smc, "smc-steer": smc_steer, "is": importance_sampling}
    if method not in samplers:
        raise SteerError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return samplers[method](program, **options)
