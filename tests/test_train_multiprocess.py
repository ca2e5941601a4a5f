"""Training under `accelerate launch` with two processes (DDP over gloo on this CPU): the same metrics as
one process with the same global batch, every file written once, and resume."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from steer.cli import main

pytestmark = pytest.mark.slow  # two training processes at once: seconds each, so not in the fast subset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    # Without a GPU, --multi_gpu makes accelerate start torchrun, and each process falls back to gloo on
    # the CPU (--cpu alone would run a single process).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "steer.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def dpo_args(tiny_text_dir, pairs, out, *extra):
    return ["train", "dpo", "--data", str(pairs), "--model", str(tiny_text_dir), "--out", str(out),
            "--max-steps", "6", "--lr", "1e-3", "--max-length", "64", "--save-steps", "3", "--no-progress", *extra]


def test_two_processes_match_one_write_once_and_resume(tiny_text_dir, arithmetic_pairs, tmp_path, capsys):
    assert main(dpo_args(tiny_text_dir, arithmetic_pairs, tmp_path / "one", "--batch-size", "4")) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())

    run = launch(dpo_args(tiny_text_dir, arithmetic_pairs, tmp_path / "two", "--batch-size", "2"))
    assert run.returncode == 0, run.stderr[-3000:]
    summaries = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # printed by the main process only
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["train"]["processes"] == 2 and one["train"]["processes"] == 1
    assert two["train"]["steps"] == one["train"]["steps"] == 6
    # each rank keeps its own random state in a checkpoint; the model is saved once
    assert {p.name for p in (tmp_path / "two" / "checkpoint-6").glob("rng_state*")} == {"rng_state_0.pth",
                                                                                        "rng_state_1.pth"}
    # the same global batch (2 x 2 against 4): the same loss within the noise of another data order
    assert two["eval"]["eval_loss"] == pytest.approx(one["eval"]["eval_loss"], abs=0.05)
    assert two["eval"]["eval_loss"] < two["eval_before"]["eval_loss"]
    # the pair metrics read every held-out pair, not the main process's shard of them
    assert two["eval"]["pairs"] == one["eval"]["pairs"] == two["pairs"]["eval"]

    # stopped after step 3: the last checkpoint and the model are gone; --resume finishes the same run
    shutil.rmtree(tmp_path / "two" / "checkpoint-6")
    shutil.rmtree(tmp_path / "two" / "model")
    resumed = launch(dpo_args(tiny_text_dir, arithmetic_pairs, tmp_path / "two", "--batch-size", "2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert again["eval"]["eval_loss"] == pytest.approx(two["eval"]["eval_loss"], abs=1e-5)
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("trainer", ["sft", "reward", "pretrain"])
def test_the_other_trainers_run_in_two_processes(trainer, tiny_text_dir, arithmetic_pairs, tmp_path):
    rows = [json.loads(line) for line in arithmetic_pairs.read_text().splitlines()]
    data = arithmetic_pairs
    if trainer == "sft":
        data = tmp_path / "sft.jsonl"
        data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                                for r in rows))
    elif trainer == "pretrain":
        data = tmp_path / "windows.jsonl"
        data.write_text("".join(json.dumps({"input_ids": [1, *range(2, 17)]}) + "\n" for _ in range(16)))
    run = launch(["train", trainer, "--data", str(data), "--model", str(tiny_text_dir), "--out", str(tmp_path / "run"),
                  "--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--no-progress"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert len([line for line in run.stdout.splitlines() if line.startswith("{")]) == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"]["processes"] == 2 and metrics["train"]["steps"] == 2
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
