"""The exceptions steer raises on purpose; the CLI turns them into one-line messages."""

from __future__ import annotations


class SteerError(Exception):
    """Base class for every error that is the user's to fix (bad input, impossible constraint)."""

    cli_prefix = "steer: error: "  # errors whose message names its own place set this to ""


class ModelLoadError(SteerError):
    """A model directory is missing, incomplete or not a causal LM."""


class ParticlesDiedError(SteerError):
    """Every particle has weight zero: the constraints cannot be met (or were never met by any sample)."""

    def __init__(self, step: int, reason: str | None = None):
        self.step = step
        self.reason = reason
        detail = f" (last reason: {reason})" if reason else ""
        super().__init__(f"all particles died at step {step}: no particle satisfied the constraints{detail}")
