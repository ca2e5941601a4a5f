"""Independent reference computations: exact enumeration of a tiny model's sequence distribution."""

from __future__ import annotations

import torch


def next_logprobs(lm, tokens: list[int]) -> torch.Tensor:
    """log p(next | tokens) from one plain full-sequence forward pass (no cache)."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([tokens], device=lm.device)).logits[0, -1].float()
    return torch.log_softmax(logits, -1).cpu()


def complete_sequences(lm, prompt: list[int], max_tokens: int, special: bool = False):
    """Every complete continuation (ending in EOS, or at max_tokens) with its exact log-probability;
    without `special`, continuations holding a control token other than EOS are left out, as
    `next_token()` leaves them out by default."""
    eos = next(iter(lm.vocab.eos_ids))
    out = {}

    def walk(generated: list[int], logp: float):
        if len(generated) == max_tokens or (generated and generated[-1] == eos):
            out[tuple(generated)] = logp
            return
        lp = next_logprobs(lm, prompt + generated)
        for t in range(lm.vocab.size):
            if special or not lm.vocab.special[t] or t in lm.vocab.eos_ids:
                walk(generated + [t], logp + lp[t].item())

    walk([], 0.0)
    return out
