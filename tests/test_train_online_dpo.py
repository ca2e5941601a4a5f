"""Online DPO on a tiny model: the first step's loss against its closed form, the logged rewards
against the reward function, the completion-only LM head against TRL's, a policy whose own samples
improve, and resume."""

import math
import shutil
import string

import pytest
import torch

from steer.template import format_prompt
from train.common import TrainOptions, load_causal_lm, load_tokenizer
from train.online_dpo import train_online_dpo

pytestmark = pytest.mark.slow  # training steps: seconds each, so not in the fast subset


def lowercase(response: str) -> float:
    return float(sum(c in string.ascii_lowercase for c in response))


def lowercase_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    return [lowercase(r) for r in responses]


def sampled_reward(directory, n: int = 64) -> float:
    """The mean reward of n pure samples (temperature 1) of 8 tokens to the instruction "x"."""
    tokenizer, model = load_tokenizer(directory), load_causal_lm(directory).eval()
    torch.manual_seed(0)
    ids = tokenizer(format_prompt("x"), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=8,
                             num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(lowercase(t) for t in texts) / n


def test_first_loss_is_ln2_and_logged_rewards_are_the_reward_functions(tmp_path, tiny_text_dir):
    seen = []

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        seen.append((prompts, lowercase_rewards(prompts, responses)))
        return seen[-1][1]

    options = TrainOptions(model=str(tiny_text_dir), out=str(tmp_path / "run"), max_steps=3, batch_size=2,
                           learning_rate=1e-3, lora=True, progress=False, save_steps=100)
    x, y = format_prompt("x"), format_prompt("y")
    metrics = train_online_dpo([x, y], reward, options, beta=0.5, max_new_tokens=6)
    steps = [row for row in metrics["log"] if "objective/scores" in row]
    assert len(steps) == 3
    # the policy starts as the reference (LoRA's B is zero): every implicit reward is 0, loss = ln 2
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # each step scores two responses to each prompt in one call, and gets the prompts as given (no BOS)
    assert len(seen) == 3
    for (prompts, values), row in zip(seen, steps):
        assert sorted(prompts) == [x, x, y, y]
        assert row["objective/scores"] == pytest.approx(sum(values) / 4)
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_the_policys_own_samples_improve(tmp_path, tiny_text_dir):
    options = TrainOptions(model=str(tiny_text_dir), out=str(tmp_path / "run"), max_steps=48, batch_size=8,
                           learning_rate=2e-3, lora=True, progress=False, save_steps=100)
    metrics = train_online_dpo([format_prompt("x")] * 64, lowercase_rewards, options, beta=0.1, max_new_tokens=8)
    before, after = sampled_reward(tiny_text_dir), sampled_reward(metrics["model"])
    # 64 samples each: the standard error of each mean is about 0.15
    assert after > before + 0.8, (before, after)
    assert metrics["reward_last"] > metrics["reward_first"]


def test_completion_only_logits_equal_trls_forward(tiny_text_dir):
    from types import SimpleNamespace

    from train.online_dpo import _trl_online_dpo

    _, trainer_class = _trl_online_dpo()
    model = load_causal_lm(tiny_text_dir).eval()
    torch.manual_seed(0)
    prompt = torch.randint(3, 90, (3, 7))
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[0, :2] = 0  # left padding
    completion = torch.randint(3, 90, (3, 5))
    completion_mask = torch.ones_like(completion)
    completion_mask[1, 3:] = 0  # right padding after an early end
    for max_length in (64, 10):  # 10: TRL cuts the prompt's start
        fake = SimpleNamespace(max_length=max_length)
        with torch.no_grad():
            ours = trainer_class._forward(fake, model, prompt, prompt_mask, completion, completion_mask)
            trls = trainer_class.__mro__[1]._forward(fake, model, prompt, prompt_mask, completion, completion_mask)
        assert ours.shape == completion.shape
        torch.testing.assert_close(ours, trls, atol=1e-5, rtol=1e-5)


def test_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path, tiny_text_dir):
    prompts = [format_prompt("x"), format_prompt("y")]

    def run(out, steps, resume=False):
        options = TrainOptions(model=str(tiny_text_dir), out=str(out), max_steps=steps, batch_size=2,
                               learning_rate=1e-3, lora=True, progress=False, save_steps=2, resume=resume)
        return train_online_dpo(prompts, lowercase_rewards, options, beta=0.5, max_new_tokens=6)

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "cut", 4)  # then as if killed after step 2's checkpoint: the later outputs never written
    for later in ("checkpoint-4", "model", "adapter"):
        shutil.rmtree(tmp_path / "cut" / later)
    (tmp_path / "cut" / "metrics.json").unlink()
    resumed = run(tmp_path / "cut", 4, resume=True)
    assert resumed["train"]["steps"] == 4
    losses = [[row["loss"] for row in m["log"] if "objective/scores" in row] for m in (whole, resumed)]
    assert losses[1][-2:] == pytest.approx(losses[0][-2:], abs=1e-4)  # the same draws and steps after the cut
