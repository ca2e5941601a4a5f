"""Hostile programs, run as a user would (`steer run FILE.steer` in a process of its own): each ends
within its budget with exit 2 and a `file:line:col` message, and its peak memory stays bounded."""

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # each case runs the CLI in a subprocess and measures it: seconds each, so not in the fast subset

PEAK_RSS_MB = 1500  # the interpreter with torch and transformers loaded takes about 400 MB of it
SECONDS = 30  # start-up included; the run's own --time-limit is 5 s

BIG = 's = "a" * 999999\n'
CASES = {
    "str of a list of a million long strings": (BIG + "l = [s] * 999999\nj = str(l)\n", "2:9",
                                                "999,999,000,000 characters and items"),
    "nested lists doubling": (BIG + "l = [s, s]\nrepeat 40:\n    l = [l, l]\nj = str(l)\n", "4:9",
                              "the limit is 10,000,000"),
    "join of a million long strings": (BIG + 'j = join([s] * 999999, "")\n', "2:14", "characters and items"),
    "membership in a huge list": (BIG + 'l = [s] * 9\nu = "a" * 999998 + "b"\nrepeat 100000:\n    x = u in l\n',
                                  "5:5", "time limit"),
    "catastrophic backtracking in a loop": ('n = 0\nrepeat 1000:\n    if matches("a" * 4000 + "b", "(a+)+$"):\n'
                                            '        n += 1\n', ("3:8", "3:5"), "time limit"),  # in the match or at the next check
    "a JSON schema nested 5,000 deep": ('s = "{\\"items\\": " * 5000 + "{}" + "}" * 5000\ncontext c = "a"\n'
                                        't = sample next(c) where json_schema(s)\n', "3:26", "nests more than 200"),
    "rounding infinity": ('x = round(exp(1000.0))\n', "1:11", "exp"),
    "a reward model outside the folder": ('reward_model judge = "../../../etc"\nx = 1\n', "1:14",
                                          "outside the program's folder"),
    "an index by absolute path": ('retriever wiki = "/etc"\nx = 1\n', "1:11", "outside the program's folder"),
    "a list grown by copying, a million times": ("l = []\nrepeat 1000000:\n    l = l + [1]\n", "3:11",
                                                 "built more than 50,000,000 characters and items"),
    "replace of the empty string": ('s = "a" * 40000\nt = "b" * 50000\nu = replace(s, "", t)\n', "3:5",
                                    "longer than 1,000,000 characters"),
    "a lone surrogate in a result": ('result "\\ud800"\n', "1:8", "half of a surrogate pair"),
    "a lone surrogate in a prompt": ('context c = "Hi \\ud800 there"\n', "1:13", "half of a surrogate pair"),
    "a float literal beyond the largest": ("x = 1e999\nresult x\n", "1:5", "beyond the largest float"),
    "float arithmetic to infinity": ("x = 1e308 * 10.0\nresult x\n", "1:11", "not a finite number"),
    "a sum to infinity": ("x = sum([1e308, 1e308])\nresult x\n", "1:5", "not a finite number"),
    "an integer literal beyond 2**63": ("result 99999999999999999999999999\n", "1:8", "beyond ±2**63"),
    "int of a huge float": ("x = int(1e300)\n", "1:5", "beyond ±2**63"),
    "int of 4,000 digits": ('x = int("9" * 4000)\n', "1:5", "beyond ±2**63"),
    "upper past the size limit": ('x = upper("\\ufb03" * 999999)\n', "1:5", "the limit is 1,000,000"),
    "lower past the size limit": ('x = lower("\\u0130" * 999999)\n', "1:5", "the limit is 1,000,000"),
}


def high_water_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), 0.0)
    except OSError:
        return 0.0


def run_measured(args: list[str]) -> tuple[int, str, float, float]:
    """(exit code, stderr, seconds, peak RSS in MB) of one process.  The peak is polled from /proc rather
    than taken from getrusage, which would count the pages of this (large) test process at the fork."""
    started = time.monotonic()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, high_water_mb(process.pid))
        time.sleep(0.01)
    stderr = process.stderr.read()
    process.stderr.close()
    return process.returncode, stderr, time.monotonic() - started, peak


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_program_ends_with_exit_2_in_bounded_time_and_memory(name, tiny_dir, tmp_path):
    source, where, message = CASES[name]
    program = tmp_path / "prog" / "hostile.steer"
    program.parent.mkdir()
    program.write_text(source)
    code, stderr, seconds, peak_mb = run_measured(
        [sys.executable, "-m", "steer.cli", "run", str(program), "--model", str(tiny_dir), "-n", "1",
         "--time-limit", "5"])
    assert code == 2, stderr[-2000:]
    places = (where,) if isinstance(where, str) else where  # the budget may run out in either place
    assert any(f"hostile.steer:{place}: " in stderr for place in places) and message in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    assert seconds < SECONDS and peak_mb < PEAK_RSS_MB, (seconds, peak_mb)


def test_absurd_sizes_are_refused_before_anything_runs(tiny_dir, tmp_path):
    program = tmp_path / "p.steer"
    program.write_text("input n = 3\nresult n\n")
    code, stderr, seconds, _ = run_measured([sys.executable, "-m", "steer.cli", "run", str(program), "--model",
                                             str(tiny_dir), "--set", "n=" + "9" * 30])
    assert code == 2 and "integers must lie within ±2**63" in stderr and seconds < SECONDS, stderr


@pytest.mark.parametrize("data,where,message", [
    ("x = 1\ny = \"caf\xe9\"\n".encode("latin-1"), "2:9", "byte 0xe9 is not UTF-8 text"),
    ('x = "a\x00b"\n'.encode(), "1:7", "a NUL character in the program"),
    (b"x = 1\n" * 200_000, "1:1", "the program is larger than 1,000,000 bytes"),
])
def test_unreadable_program_files_are_errors_at_their_place(data, where, message, tmp_path):
    program = tmp_path / "bad.steer"
    program.write_bytes(data)
    for command in ("check", "run"):
        code, stderr, seconds, _ = run_measured([sys.executable, "-m", "steer.cli", command, str(program)])
        assert code == 2 and f"bad.steer:{where}: {message}" in stderr and "Traceback" not in stderr, stderr
        assert seconds < SECONDS


def test_a_byte_order_mark_is_not_part_of_the_program(tmp_path):
    program = tmp_path / "bom.steer"
    program.write_bytes("\ufeffx = 1\nresult x\n".encode())
    code, stderr, _, _ = run_measured([sys.executable, "-m", "steer.cli", "check", str(program)])
    assert code == 0, stderr


@pytest.mark.parametrize("source,where,message", [
    ('model "/etc"\nx = 1\n', "1:1", "outside the program's folder"),
    ('model "~"\nx = 1\n', "1:1", "outside the program's folder"),
    ('model "root"\nx = 1\n', "1:1", "outside the program's folder"),  # a symlink to /
    ('model ""\nx = 1\n', "1:1", "the path is empty"),
    ('retriever w = "sub/../../../.."\nx = 1\n', "1:11", "outside the program's folder"),
    ('reward_model j = "a\\x00b"\nx = 1\n', "1:14", "NUL character"),
    ("input n = -1\nsampler smc(particles = n)\nx = 1\n", "2:25", "particles must be a whole number"),
])
def test_check_refuses_what_run_refuses_at_the_same_place(source, where, message, tmp_path):
    """`steer check` makes every static check `steer run` makes, and `run` makes them before a model loads."""
    (tmp_path / "root").symlink_to("/")
    program = tmp_path / "p.steer"
    program.write_text(source)
    for command in ("check", "run"):
        code, stderr, seconds, _ = run_measured([sys.executable, "-m", "steer.cli", command, str(program)])
        assert code == 2 and f"p.steer:{where}: " in stderr and message in stderr, (command, stderr)
        assert "Traceback" not in stderr
        assert seconds < SECONDS


@pytest.mark.parametrize("use", ["s = str(l)\n", "b = l == [l]\n", "result l\n"])
def test_a_value_nested_too_deeply_is_reported_where_it_is_used(use, tiny_dir, tmp_path):
    where = "4:1"  # the statement that prints, compares or returns it
    program = tmp_path / "deep.steer"
    program.write_text("l = []\nrepeat 5000:\n    l = [l]\n" + use)
    code, stderr, seconds, _ = run_measured([sys.executable, "-m", "steer.cli", "run", str(program), "--model",
                                             str(tiny_dir), "-n", "1", "--time-limit", "5"])
    assert code == 2 and f"deep.steer:{where}: " in stderr and "nested too deeply" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr and seconds < SECONDS
