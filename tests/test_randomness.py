"""The two-level inverse-CDF sampler against its distribution: frequencies, zeros never drawn, blocks."""

import torch

from steer.randomness import categorical, seed


def test_draw_frequencies_match_probabilities_across_blocks():
    seed(0)
    probs = torch.tensor([[0.1, 0.0, 0.3, 0.0, 0.6, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]])
    draws = categorical(probs, 100_000, block=2)  # 7 tokens in blocks of 2: padding and several blocks
    assert draws.shape == (2, 100_000)
    first = torch.bincount(draws[0], minlength=7).double() / 100_000
    assert torch.allclose(first, torch.tensor([0.1, 0.0, 0.3, 0.0, 0.6, 0.0, 0.0], dtype=torch.float64), atol=0.006)
    assert (draws[1] == 6).all()  # unnormalised rows, and a lone token at the end


def test_zero_probability_tokens_are_never_drawn_on_a_full_vocabulary():
    seed(1)
    logits = torch.randn(4, 262_144) * 4
    probs = torch.softmax(logits, -1)
    probs[:, ::3] = 0.0  # a mask
    draws = categorical(probs, 2_000)
    assert (draws % 3 != 0).all()
    # the most likely token of each row is drawn about as often as its probability says
    top = probs.argmax(-1, keepdim=True)
    share = (draws == top).double().mean(-1)
    expected = (probs.gather(1, top)[:, 0] / probs.sum(-1)).double()
    assert ((share - expected).abs() < 4 * (expected * (1 - expected) / 2_000).sqrt() + 1e-3).all()


def test_a_vocabulary_within_one_block_is_drawn_by_its_probabilities_and_never_a_zero():
    seed(2)
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3, 0.0], [0.0, 1e-30, 0.0, 0.0, 0.0]])  # 5 tokens: one block
    draws = categorical(probs, 100_000)
    first = torch.bincount(draws[0], minlength=5).double() / 100_000
    assert torch.allclose(first, torch.tensor([0.2, 0.0, 0.5, 0.3, 0.0], dtype=torch.float64), atol=0.006)
    assert (draws[1] == 1).all()  # a lone tiny mass is still the only choice
    assert categorical(probs[0], 3).shape == (3,) and categorical(probs[None], 2).shape == (1, 2, 2)
