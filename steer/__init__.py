"""steer: control language models with probabilistic programs and Sequential Monte Carlo."""

import os

# Before torch loads its OpenMP runtime: idle OpenMP threads sleep instead of spinning.  On a shared
# CPU, spinning threads keep the cores from the work that would release them (20 reward-model steps
# took 21 minutes on 2 cores, 2.5 with passive waits).  A policy the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .constraints import checks, masks, patterns
from .constraints import tilts
from .distributions import (
    Bernoulli,
    Categorical,
    Continuation,
    Distribution,
    Geometric,
    NextToken,
    TokenInMask,
)
from .errors import ModelLoadError, ParticlesDiedError, SteerError
from .generate import Generate
from .context import LMContext
from .lm import HFLanguageModel, LanguageModel, Token, Vocabulary, load_model, tiny_model
from .mixture import MixtureContext
from .program import Program, SubProgram, program
from .smc import Posterior, StepRecord, importance_sampling, run, smc, smc_steer
from .words import NextWord

__all__ = [
    "Bernoulli",
    "Categorical",
    "Continuation",
    "Distribution",
    "Generate",
    "Geometric",
    "HFLanguageModel",
    "LMContext",
    "LanguageModel",
    "MixtureContext",
    "ModelLoadError",
    "NextToken",
    "NextWord",
    "ParticlesDiedError",
    "Posterior",
    "Program",
    "SteerError",
    "StepRecord",
    "SubProgram",
    "Token",
    "TokenInMask",
    "Vocabulary",
    "checks",
    "importance_sampling",
    "load_model",
    "masks",
    "patterns",
    "program",
    "run",
    "smc",
    "smc_steer",
    "tilts",
    "tiny_model",
]
