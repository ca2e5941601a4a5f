import pytest

import steer


@pytest.fixture(scope="session")
def tiny_lm():
    """A 4-token model (<eos>, <bos>, a, b): every sequence can be enumerated."""
    return steer.tiny_model("ab", seed=2, temperature=2.0)


@pytest.fixture(scope="session")
def gemma():
    """The real default model (converted once into the cache, then loaded in seconds)."""
    return steer.load_model()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny model saved as a local model directory, for commands that take --model."""
    path = tmp_path_factory.mktemp("tiny")
    lm = steer.tiny_model("ab ", seed=2, temperature=2.0, max_length=64)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_for_fuzz():
    """A tiny model over letters, space, digits and punctuation, so mutated examples can run."""
    return steer.tiny_model("abcdefghijklmnopqrstuvwxyz .,-0123456789\n", seed=3, max_length=256)


def save_tiny_text_model(path, seed: int, max_length: int):
    """A tiny model over printable ASCII saved as a model directory: trainers run on it in seconds."""
    import string

    lm = steer.tiny_model(string.printable[:95] + "\n", seed=seed, hidden=32, max_length=max_length)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("tiny-text"), seed=4, max_length=256)


@pytest.fixture(scope="session")
def tiny_long_dir(tmp_path_factory):
    """A tiny text model with room for the judge prompt (about 1,700 characters)."""
    return save_tiny_text_model(tmp_path_factory.mktemp("tiny-long"), seed=5, max_length=4096)


@pytest.fixture(scope="session")
def arithmetic_pairs(tmp_path_factory):
    """Preference pairs a tiny model can learn: the right sum is chosen over a wrong, longer answer."""
    import json
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(24):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"add {a} and {b}", "chosen": f"{a + b}", "rejected": f"{a + b + 1} maybe"})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def gemma_reward_dir(tmp_path_factory):
    """A reward model on the real default model: LoRA, two steps on vendored HH-RLHF pairs."""
    from pathlib import Path

    from train.common import TrainOptions
    from train.reward import train_reward

    out = tmp_path_factory.mktemp("gemma-rm")
    data = Path(__file__).resolve().parents[1] / "examples" / "data" / "hh_rlhf_harmless.jsonl.gz"
    options = TrainOptions(out=str(out), max_steps=2, batch_size=2, max_length=192, lora=True, lora_r=4,
                           limit=12, eval_fraction=0.34, save_steps=1000, progress=False, learning_rate=1e-4)
    metrics = train_reward(data, options)
    return Path(metrics["model"]), metrics
