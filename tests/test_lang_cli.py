"""`steer run` and `steer check`: exit codes 0 (ok), 2 (the user's to fix), 1 (internal)."""

import json
import subprocess
import sys

import pytest

from steer.cli import main
from steer_lang import Script

GOOD = """
input prompt = "ab"
input n = 3
sampler smc-steer(particles = 3, beam = 2, seed = 1)
context c = prompt
repeat n:
    t = sample next(c) where word_length(max=2)
    if t == eos:
        finish
"""


@pytest.fixture
def write(tmp_path):
    def write(text, name="prog.steer"):
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


def test_check_ok(write, capsys):
    path = write(GOOD)
    assert main(["check", path]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: ok (inputs: prompt: str, n: int; sampler: smc-steer)")


def test_check_reports_every_error_with_its_place(write, capsys):
    path = write('context c = "a"\nx = y\nwhile true:\n    x = 1\nz = len(1, 2)\n')
    assert main(["check", path]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith(path)]
    assert [l.split(": ")[0] for l in lines] == [f"{path}:2:5", f"{path}:3:1", f"{path}:5:5"]


def test_run_prints_the_posterior_with_file_settings_and_flag_overrides(tiny_dir, write, capsys):
    path = write(GOOD)
    assert main(["run", path, "--model", str(tiny_dir), "--set", "n=2", "--json"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    particles, summary = lines[:-1], lines[-1]["summary"]
    assert summary["method"] == "smc-steer" and summary["particles"] == 3  # from the file
    assert all(len(p["text"]) <= 2 for p in particles)  # n=2 tokens at most
    assert sum(p["weight"] for p in particles) == pytest.approx(1.0)
    assert main(["run", path, "--model", str(tiny_dir), "--method", "is", "-n", "5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])["summary"]
    assert summary["method"] == "is" and summary["particles"] == 5


def test_run_text_output_and_trace(tiny_dir, write, tmp_path, capsys):
    trace = tmp_path / "trace.html"
    assert main(["run", write(GOOD), "--model", str(tiny_dir), "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "log_ml =" in out
    html = trace.read_text()
    assert "<svg" in html and "ESS" in html and "prog.steer" in html


@pytest.mark.parametrize("args,source,message", [
    ([], "x = (1 +\n", "prog.steer:1:8: syntax error: unexpected end of file"),
    ([], "x = 1 // 0\n", "prog.steer:1:7: division by zero"),
    (["--set", "m=1"], GOOD, "unknown input 'm'; the program declares: prompt, n"),
    (["--set", "n=three"], GOOD, "input 'n' is int, got 'three'"),
    (["--set", "n"], GOOD, "--set needs NAME=VALUE"),
    (["--particles", "0"], GOOD, "--particles must be at least 1"),
    (["--ess", "3"], GOOD, "--ess must be in (0, 1]"),
    (["--model", "/no/such/model"], GOOD, "model directory not found"),
    ([], "input need: str\n", "input 'need' has no default; give it with --set need=VALUE"),
])
def test_user_errors_exit_2_without_traceback(tiny_dir, write, capsys, args, source, message):
    argv = ["run", write(source), *(["--model", str(tiny_dir)] if "--model" not in args else []), *args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err


def test_missing_file_is_a_user_error(capsys):
    assert main(["check", "/no/such/file.steer"]) == 2
    assert "cannot read /no/such/file.steer" in capsys.readouterr().err


def test_internal_errors_exit_1(tiny_dir, write, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Script, "run", broken)
    assert main(["run", write(GOOD), "--model", str(tiny_dir)]) == 1
    assert "internal error: RuntimeError: boom" in capsys.readouterr().err


@pytest.mark.slow
def test_the_installed_command_exits_2_on_a_bad_file(write):
    path = write("repeat 3\n    x = 1\n")
    out = subprocess.run([sys.executable, "-m", "steer.cli", "check", path], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith(f"{path}:1:9: syntax error: unexpected end of line; expected ':'")
    assert "Traceback" not in out.stderr


def strict_loads(line: str):
    """json.loads that refuses the non-standard constants (-Infinity, NaN) Python would accept."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def test_every_json_output_is_strict_json(tiny_dir, write, capsys):
    """Dead particles (a failed condition under importance sampling) print a null log weight."""
    from steer.cli import main as steer_main

    path = write('context c = "a"\nrepeat 2:\n    sample next(c)\ncondition contains(text(c), "b")\n'
                 'result text(c)\n')
    assert main(["run", path, "--model", str(tiny_dir), "--method", "is", "-n", "12", "--seed", "1", "--json"]) == 0
    lines = [strict_loads(line) for line in capsys.readouterr().out.splitlines()]
    particles = lines[:-1]
    dead = [p for p in particles if not p["alive"]]
    assert dead and all(p["log_weight"] is None and p["weight"] == 0.0 for p in dead)
    assert all(isinstance(p["log_weight"], float) for p in particles if p["alive"])
    assert steer_main(["generate", "--model", str(tiny_dir), "--prompt", "ab", "-n", "4", "-t", "3", "--json"]) == 0
    for line in capsys.readouterr().out.splitlines():
        strict_loads(line)
