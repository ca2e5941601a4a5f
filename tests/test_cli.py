"""The `steer` command: output formats and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from steer.cli import main


def test_generate_json(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "ab", "-n", "5", "-t", "4", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    particles, summary = lines[:-1], lines[-1]["summary"]
    assert len(particles) == 5
    assert sum(p["weight"] for p in particles) == pytest.approx(1.0)
    # (healing backs off "ab"; a first token that only re-writes it is a step that writes nothing)
    assert summary["steps"] <= 5 and all(p["text"] for p in particles)
    assert summary["particles"] == 5 and summary["method"] == "smc" and "log_ml" in summary


def test_generate_stop_string(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "a", "-n", "8", "-t", "20",
                 "--stop", "b", "--json", "--method", "is"]) == 0
    texts = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert all("b" not in t for t in texts)


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "model directory not found"),
    (["--particles", "0"], "--particles must be at least 1"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--prompt", "a" * 100], "the model's context"),
    (["--prompt", "a" * 50, "-t", "30"], "exceeds the model's context"),
    (["--method", "mcmc"], "invalid choice"),
    (["--seed", "-5"], "--seed must be at least 0"),
    (["--ess", "2"], "--ess must be in (0, 1]"),
    (["--particles", str(10**23)], "below 2**63"),
    (["--backend", "tgi"], "invalid choice"),
    (["--dtype", "int4"], "invalid choice"),
    (["--device", "gpu0"], "cannot place the model on 'gpu0'"),
    (["--particles", str(10**11)], "GiB is available; use fewer particles"),  # refused before sampling
    (["--backend", "vllm", "--device", "cuda"], "drop `device`"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_dir, capsys, args, message):
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "ab", *args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err


def test_trace_page(tiny_dir, tmp_path, capsys):
    page = tmp_path / "run.html"
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "a", "-n", "4", "-t", "3", "--ess", "1",
                 "--trace", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "<script" not in text  # self-contained, static
    assert 1 <= text.count("<details>") <= 4 and "<svg" in text  # a step per token, one re-writing "a" and "ESS after each step" in text


@pytest.mark.slow
def test_console_script_on_the_default_model(tmp_path):
    page = tmp_path / "trace.html"
    out = subprocess.run([sys.executable, "-m", "steer.cli", "generate", "--prompt", "The sky is",
                          "-n", "3", "-t", "5", "--seed", "1", "--trace", str(page)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "log_ml =" in out.stdout and len(out.stdout.splitlines()) >= 2
    assert page.read_text().count("<details>") >= 1


@pytest.mark.parametrize("user, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_wait_passively_unless_the_user_says_otherwise(user, expected):
    """Set before torch loads its OpenMP runtime (which reads it once, at load)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user:
        env["OMP_WAIT_POLICY"] = user
    code = ("import sys, steer, os; assert 'torch' in sys.modules; "
            "print(os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
