"""Boolean masks over the vocabulary combined through NumPy: on a 262k-token vocabulary torch's
`&`, `|` and `~` on bool tensors take about half a millisecond each, NumPy's (on the same memory,
no copy) about fifteen microseconds.  A leaf module: it imports nothing of steer."""

from __future__ import annotations

import numpy as np
import torch


def both(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.logical_and(a.numpy(), b.numpy()))


def either(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.logical_or(a.numpy(), b.numpy()))


def negate(a: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.logical_not(a.numpy()))
