"""Backends: the generic contract on the transformers backend and on a backend written here, and adding
a backend in one place makes it usable from `load_model`, `steer generate` and a `.steer` program."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from backend_contract import check_backend_contract

import steer
from steer.cli import main
from steer.errors import ModelLoadError
from steer.lm import registry
from steer.lm.base import LanguageModel, Vocabulary


class BigramLM(LanguageModel):
    """A backend in a few lines: next-token log-probabilities depend on the last token only."""

    def __init__(self, alphabet: str, seed: int, name: str = "bigram"):
        strings = ["", ""] + list(alphabet)  # 0: end of text, 1: beginning of text
        special = np.array([True, True] + [False] * len(alphabet))
        self.vocab = Vocabulary(strings, frozenset({0}), 1, special)
        self.max_length, self.name = 128, name
        g = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(torch.randn(len(strings), len(strings), generator=g), -1)
        self.rounds = 0

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        return ([1] if bos else []) + [self.vocab.strings.index(c, 2) for c in text]

    def advance(self, requests) -> None:
        self.rounds += 1
        for request in requests:
            ctx = request.context
            tokens, k = ctx.tokens, request.score
            ctx.logprobs = self.table[tokens[-1]].float()
            ctx.draw = None
            ctx.pending_scores = [self.table[tokens[j - 1], tokens[j]].item()
                                  for j in range(len(tokens) - k, len(tokens))] if k else None
            ctx.backend_state = self.rounds  # (this backend keeps nothing per sequence; any value will do)

    def release(self, context) -> None:
        context.backend_state = None


def load(directory: Path, *, name: str, device=None, dtype=None, **options) -> BigramLM:
    """This backend's own directory format: a `bigram.json` naming its alphabet and seed."""
    spec = directory / "bigram.json"
    if not spec.is_file():
        raise ModelLoadError(f"not a bigram model directory (no bigram.json): {directory}")
    found = json.loads(spec.read_text())
    return BigramLM(found["alphabet"], found["seed"], name=name)


@pytest.fixture
def bigram_dir(tmp_path, monkeypatch):
    """The backend registered (in one place) for this test only, and a model directory for it."""
    monkeypatch.setitem(registry._REGISTERED, "bigram", registry.Backend("bigram", load, "a bigram table"))
    (tmp_path / "bigram.json").write_text(json.dumps({"alphabet": "ab .\n", "seed": 3}))
    return tmp_path


def test_the_transformers_backend_keeps_the_contract():
    check_backend_contract(steer.tiny_model("ab .", seed=1, merges=[("a", "b")]), "ab ab.")


def test_a_backend_written_outside_steer_keeps_the_contract(bigram_dir):
    check_backend_contract(steer.load_model(bigram_dir, backend="bigram"), "ab ab.")


def test_a_registered_backend_runs_generate_and_a_steer_program(bigram_dir, tmp_path, capsys):
    assert "bigram" in steer.lm.backend_names()
    code = main(["generate", "--prompt", "ab", "--backend", "bigram", "--model", str(bigram_dir),
                 "-n", "4", "-t", "5", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 5 and all(set(r["text"]) <= set("ab .\n") for r in rows[:4])
    assert math.isclose(sum(r["weight"] for r in rows[:4]), 1.0, abs_tol=1e-6)

    program = tmp_path / "short.steer"
    program.write_text(f'model "{bigram_dir}", backend = "bigram"\n'
                       'context c = "ab.", max_tokens = 8\n'
                       'repeat 6:\n'
                       '    t = sample next(c) where charset("ab ")\n'
                       'result text(c)\n')
    assert main(["check", str(program)]) == 0
    capsys.readouterr()
    code = main(["run", str(program), "-n", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    texts = [r["text"] for r in rows if "text" in r]
    assert len(texts) == 3 and all(len(t) == 6 and set(t) <= set("ab ") for t in texts), rows


def test_an_unknown_backend_names_the_registered_ones(bigram_dir):
    with pytest.raises(ModelLoadError, match="unknown backend 'nope'; choose one of .*bigram"):
        steer.load_model(bigram_dir, backend="nope")
    with pytest.raises(ModelLoadError, match="no bigram.json"):
        steer.load_model(bigram_dir.parent, backend="bigram")
