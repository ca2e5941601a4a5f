"""SFT on a tiny model: the loss covers completion tokens (and EOS) only, and it goes down."""

import json
import random

import pytest
import torch

import steer
from train.common import TrainOptions, load_causal_lm
from train.data import held_out, load_examples
from train.sft import train_sft

pytestmark = pytest.mark.slow  # training steps: seconds each, so not in the fast subset


def test_sft_learns_completions_and_its_loss_is_the_completion_nll(tmp_path, tiny_text_dir):
    rng = random.Random(0)
    rows = []
    for _ in range(30):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"add {a} and {b}", "completion": f"{a + b}"})
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = TrainOptions(model=str(tiny_text_dir), out=str(tmp_path / "run"), max_steps=20, save_steps=10,
                           learning_rate=3e-3, eval_fraction=0.2, progress=False, batch_size=8)
    metrics = train_sft(data, options)
    assert metrics["eval"]["eval_loss"] < 0.6 * metrics["eval_before"]["eval_loss"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]["steps"] == 20

    # The reported loss is the mean NLL of completion tokens plus EOS, prompts excluded.
    model = load_causal_lm(tmp_path / "run" / "model")
    lm = steer.load_model(tmp_path / "run" / "model")
    _, evaluation = held_out(load_examples(data), 0.2, seed=0)
    total, count = 0.0, 0
    for example in evaluation:
        prompt = lm.tokenizer(example.prompt)["input_ids"]
        ids = prompt + lm.tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [lm.tokenizer.eos_token_id]
        with torch.no_grad():
            logps = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        targets = torch.tensor(ids[1:])
        total -= logps[len(prompt) - 1:].gather(-1, targets[len(prompt) - 1:, None]).sum().item()
        count += len(ids) - len(prompt)
    assert metrics["eval"]["eval_loss"] == pytest.approx(total / count, rel=1e-4)
