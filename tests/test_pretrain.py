"""Pretraining on packed windows: a small model from a config on a data vocabulary, continued
pretraining of a model directory, perplexity checked against a direct computation, bad windows."""

import json
import math

import pytest
import torch
from conftest import wikipedia_rows

from steer.cli import main
from steer.jsonl import DataError
from train.common import TrainOptions, load_tokenizer, model_dir
from train.icp import pack
from train.pretrain import load_windows, perplexity, pretrain

pytestmark = pytest.mark.slow  # training steps: seconds each, so not in the fast subset


def write_windows(path, windows):
    path.write_text("".join(json.dumps({"input_ids": w}) + "\n" for w in windows))
    return path


@pytest.fixture(scope="module")
def wiki_windows(tmp_path_factory):
    tokenizer = load_tokenizer(model_dir(None))
    texts = [r["text"] for r in wikipedia_rows(2, 6)]
    windows, _ = pack(tokenizer(texts, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, 64,
                      tokenizer.bos_token_id)
    return write_windows(tmp_path_factory.mktemp("windows") / "windows.jsonl", windows[:12])


def direct_loss(model_path, windows):
    """Mean next-token cross-entropy of the saved model, computed here without the Trainer."""
    from transformers import AutoModelForCausalLM

    saved = json.loads((model_path / "vocabulary.json").read_text())
    position = {t: i for i, t in enumerate(saved["token_ids"])}
    ids = torch.tensor([[position.get(t, saved["unk"]) for t in w] for w in windows])
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_small_model_from_scratch_learns_and_reports_true_perplexity(wiki_windows, tmp_path):
    options = TrainOptions(out=str(tmp_path / "run"), max_steps=15, batch_size=4, learning_rate=3e-3,
                           save_steps=100, progress=False)
    metrics = pretrain(wiki_windows, options, config="tiny", eval_data=wiki_windows)
    windows = load_windows(wiki_windows)
    vocabulary = json.loads((tmp_path / "run/model/vocabulary.json").read_text())["token_ids"]
    assert set(vocabulary) >= {t for w in windows for t in w}
    assert metrics["tokens"]["vocabulary"] == len(vocabulary) < 2000  # not the 262k of the tokenizer
    assert metrics["eval"]["perplexity"] < metrics["eval_before"]["perplexity"]
    assert metrics["eval"]["perplexity"] == pytest.approx(math.exp(metrics["eval"]["eval_loss"]))
    assert direct_loss(tmp_path / "run/model", windows) == pytest.approx(metrics["eval"]["eval_loss"], abs=1e-4)
    saved = json.loads((tmp_path / "run/metrics.json").read_text())
    assert saved["windows"] == {"train": 12, "eval": 12, "length": 64}


def test_the_vocabulary_comes_from_training_windows_only(wiki_windows, tmp_path):
    windows = load_windows(wiki_windows)
    train, held = windows[:8], windows[8:]
    unseen = {t for w in held for t in w} - {t for w in train for t in w}
    assert unseen  # the held-out windows hold tokens training never saw
    options = TrainOptions(out=str(tmp_path / "run"), max_steps=4, batch_size=4, learning_rate=3e-3,
                           save_steps=100, progress=False)
    metrics = pretrain(write_windows(tmp_path / "train.jsonl", train), options, config="tiny",
                       eval_data=write_windows(tmp_path / "held.jsonl", held))
    saved = json.loads((tmp_path / "run/model/vocabulary.json").read_text())
    assert not unseen & set(saved["token_ids"]) and saved["unk"] == len(saved["token_ids"])
    count = sum(t in unseen for w in held for t in w)
    assert metrics["eval_unknown_tokens"]["count"] == count
    assert metrics["eval_unknown_tokens"]["share"] == pytest.approx(count / (len(held) * 64))
    assert direct_loss(tmp_path / "run/model", held) == pytest.approx(metrics["eval"]["eval_loss"], abs=1e-4)
    assert perplexity(tmp_path / "run/model", held) == pytest.approx(metrics["eval"]["perplexity"], rel=1e-4)


def test_continued_pretraining_of_a_model_directory(tiny_text_dir, tmp_path, capsys):
    tokenizer = load_tokenizer(tiny_text_dir)
    ids = tokenizer(["hello world, " * 20], add_special_tokens=False)["input_ids"]
    windows, _ = pack(ids, tokenizer.eos_token_id, 32)
    data = write_windows(tmp_path / "w.jsonl", windows * 3)
    assert main(["train", "pretrain", "--data", str(data), "--model", str(tiny_text_dir), "--out",
                 str(tmp_path / "run"), "--max-steps", "6", "--lr", "1e-2", "--eval-fraction", "0.3",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 6 and summary["perplexity"] < summary["perplexity_before"]
    assert not (tmp_path / "run/model/vocabulary.json").exists()  # the model keeps its own vocabulary


def test_continued_pretraining_of_the_default_model_with_lora(wiki_windows, tmp_path):
    options = TrainOptions(out=str(tmp_path / "run"), max_steps=1, batch_size=1, learning_rate=1e-4, lora=True,
                           limit=3, eval_fraction=0.34, save_steps=100, progress=False)
    metrics = pretrain(wiki_windows, options)
    assert metrics["windows"] == {"train": 2, "eval": 1, "length": 64}
    assert 1 < metrics["eval"]["perplexity"] < 100  # a real pretrained LM on Wikipedia text (with its BOS)
    assert (tmp_path / "run/adapter").is_dir() and (tmp_path / "run/model/model.safetensors").is_file()


def test_bad_windows_are_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": "1 2 3"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'input_ids' must be a non-empty list"):
        load_windows(bad)
    uneven = write_windows(tmp_path / "uneven.jsonl", [[1, 2, 3], [1, 2]])
    with pytest.raises(DataError, match="different lengths"):
        load_windows(uneven)
    with pytest.raises(DataError, match="unknown model config 'huge'"):
        pretrain(write_windows(tmp_path / "ok.jsonl", [[1, 2, 3]] * 4),
                 TrainOptions(out=str(tmp_path / "o"), progress=False), config="huge")
