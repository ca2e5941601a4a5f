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
