"""Batched sampling for the trainers that generate their own data (`train.generation.Generator`)."""

import random

import pytest
import torch

from train.generation import Generator, length_groups


def test_length_groups_cover_every_prompt_once_and_bound_the_padding():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([rng.randint(1, 20), rng.randint(100, 1200)]) for _ in range(rng.randint(1, 40))]
        size = rng.randint(1, 8)
        groups = length_groups(lengths, size)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert len(g) <= size
            padded, read = len(g) * max(lengths[i] for i in g), sum(lengths[i] for i in g)
            assert len(g) == 1 or padded <= 1.25 * read
    # one long prompt among short ones is read alone, not padded into their batch
    assert length_groups([10, 1000, 12, 11], 8) == [[0, 3, 2], [1]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_samples_read_each_prompt_once_and_continue_it_exactly(tiny_text_dir, temperature):
    """The shared prefill reads the left-padded prompts once (the cache is repeated per sample), and
    every sample's next-token logits at every step are those of the unpadded prompt plus the sample so
    far, read from scratch."""
    g = Generator(tiny_text_dir, batch_size=12)
    prompts = ["add 1 and 2", "a much longer prompt, padded less than the others", "x"]
    batch = g.tokenizer(prompts, return_tensors="pt", padding=True)
    width, n = batch["input_ids"].shape[1], 3
    calls = []
    hook = g.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = g._sample(batch, n, max_new_tokens=6, do_sample=temperature > 0, output_logits=True,
                        return_dict_in_generate=True, **({"temperature": temperature} if temperature else {}))
    hook.remove()
    assert calls[0] == (len(prompts), width - 1)  # the prompts, read once each
    assert all(shape[0] == n * len(prompts) and shape[1] == 1 for shape in calls[1:])
    logits = torch.stack(out.logits, 1)  # (samples, steps, vocabulary)
    for row, sequence in enumerate(out.sequences):
        prompt = g.tokenizer(prompts[row // n]).input_ids
        tokens = torch.tensor([prompt + sequence[width:].tolist()])
        with torch.no_grad():
            reference = g.model(input_ids=tokens).logits[0, len(prompt) - 1:-1]
        steps = min(len(reference), logits.shape[1])
        torch.testing.assert_close(logits[row, :steps], reference[:steps], atol=1e-4, rtol=1e-4)


def test_batches_by_length_return_samples_in_the_prompts_order(tiny_text_dir):
    g = Generator(tiny_text_dir, batch_size=4)
    prompts = ["a" * 40, "b", "c" * 3, "d" * 41, "e" * 2]

    def echo(batch, n, **options):  # each prompt "continued" by itself: its samples say whose they are
        ids = batch["input_ids"].repeat_interleave(n, 0)
        return torch.cat([ids, ids], 1)

    g._sample = echo
    assert g.generate(prompts, n=2, max_new_tokens=1) == [[p, p] for p in prompts]
