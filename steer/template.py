"""The plain instruction template steer uses wherever a prompt meets a model.

Gemma 3 270M is a base model without a chat template.  Trainers (SFT, DPO, reward models) and reward
potentials all format prompts with this one template, so a reward model scores text laid out exactly
as it saw it in training.
"""

from __future__ import annotations

TEMPLATE = "Instruction:\n{instruction}\n\nResponse:\n"


def format_prompt(instruction: str) -> str:
    """The instruction template: what a model sees before its response."""
    return TEMPLATE.format(instruction=instruction.strip())
