"""Fault injection: processes killed with SIGKILL at unlucky moments (while a checkpoint is written, at
random points of training, while a model is converted, while a report is written) lose nothing: the
next run resumes to the same result, and every file is the old one or the new one, never a part."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import steer

from steer.files import TEMPORARY

pytestmark = pytest.mark.slow  # processes killed and resumed, training runs: seconds each, so not in the fast subset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def start(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**ENV, **env})


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL `process` as soon as `ready()` holds (polled every millisecond); False if it ended first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    process.wait()
    return False


def dpo(tiny_text_dir, pairs, out, *extra) -> list[str]:
    return ["-m", "steer.cli", "train", "dpo", "--data", str(pairs), "--model", str(tiny_text_dir), "--out",
            str(out), "--max-steps", "8", "--batch-size", "4", "--lr", "1e-3", "--max-length", "64",
            "--save-steps", "1", "--no-progress", *extra]


def checkpoint_being_written(out: Path) -> bool:
    return any(d.name.startswith("checkpoint-") and not (d / "trainer_state.json").exists()
               for d in out.glob("checkpoint-*"))


def test_training_killed_mid_checkpoint_and_at_random_resumes_to_the_same_result(tiny_text_dir, arithmetic_pairs,
                                                                                 tmp_path):
    whole = start(dpo(tiny_text_dir, arithmetic_pairs, tmp_path / "whole"))
    assert whole.wait() == 0, whole.stderr.read()[-2000:]
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())

    # First kill: while a checkpoint folder exists but its trainer_state.json (written last) does not.
    # The window is some milliseconds per checkpoint; a run that slips through is tried again.
    for attempt in range(4):
        out = tmp_path / f"killed-{attempt}"
        if kill_when(start(dpo(tiny_text_dir, arithmetic_pairs, out)), lambda: checkpoint_being_written(out)):
            break
    assert checkpoint_being_written(out)  # a half-written checkpoint is left behind
    rng = random.Random(0)
    for _ in range(2):  # then at random moments of resumed runs
        delay = rng.uniform(6, 9)  # start-up takes about 5 s here
        run = start(dpo(tiny_text_dir, arithmetic_pairs, out, "--resume"))
        started = time.monotonic()
        kill_when(run, lambda: time.monotonic() - started > delay)
    final = start(dpo(tiny_text_dir, arithmetic_pairs, out, "--resume"))
    assert final.wait() == 0, final.stderr.read()[-2000:]
    got = json.loads((out / "metrics.json").read_text())
    assert got["train"]["steps"] == expected["train"]["steps"] == 8
    assert got["eval"]["eval_loss"] == pytest.approx(expected["eval"]["eval_loss"], abs=1e-5)
    assert not checkpoint_being_written(out)

    # Killed after the last checkpoint (here: a finished run resumed again): no step past --max-steps.
    again = start(dpo(tiny_text_dir, arithmetic_pairs, tmp_path / "whole", "--resume"))
    assert again.wait() == 0, again.stderr.read()[-2000:]
    rerun = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert rerun["train"]["steps"] == 8
    assert rerun["eval"]["eval_loss"] == pytest.approx(expected["eval"]["eval_loss"], abs=1e-6)


def test_a_report_killed_while_written_is_the_old_one_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "trace.html"
    writer = """
import sys
from steer.files import atomic_write_text
body = "<p>" + "x" * 5_000_000 + "</p>"
for i in range(10_000):
    atomic_write_text(sys.argv[1], f"<html>{i}{body}</html>")
"""
    process = start(["-c", writer, str(target)])
    killed = kill_when(process, lambda: any(p.name.startswith(TEMPORARY) for p in tmp_path.iterdir())
                       and target.exists())
    assert killed
    text = target.read_text()
    assert text.startswith("<html>") and text.endswith("</p></html>")  # a whole earlier version
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(TEMPORARY)]
    from steer.files import atomic_write_text

    atomic_write_text(target, "<html>new</html>")
    assert target.read_text() == "<html>new</html>"
    assert not any(p.exists() for p in leftovers)  # the killed writer's temporary is gone


def test_a_conversion_killed_half_way_leaves_no_model_and_is_cleaned_up(tmp_path):
    cache = tmp_path / "cache"
    models = cache / "models"
    process = start(["-c", "import steer.lm.loading as l; l.default_model_path()"], STEER_CACHE=str(cache))
    assert kill_when(process, lambda: models.is_dir() and any(p.name.startswith(".convert-")
                                                              for p in models.iterdir()), timeout=600)
    assert not (models / "gemma-3-270m").exists()  # never a half-written model under the real name
    from steer.files import remove_stale

    stale = [p for p in models.iterdir() if p.name.startswith(".convert-")]
    assert stale and remove_stale(models, ".convert-") == stale  # what the next conversion does first


def test_a_cached_model_cut_short_is_converted_again(tiny_dir, tmp_path, monkeypatch):
    """A converted model records its files' sizes; one cut short (a full disk, a crash) is rebuilt
    before anything reads it."""
    import shutil

    import steer.lm.loading as loading

    monkeypatch.setenv("STEER_CACHE", str(tmp_path))
    target = tmp_path / "models" / loading.DEFAULT_MODEL
    shutil.copytree(tiny_dir, target)
    loading._write_manifest(target)
    converted = []
    monkeypatch.setattr(loading, "_convert_default_model", converted.append)  # the real one takes minutes
    assert loading.default_model_path() == target and not converted  # intact: used as it is
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert loading.default_model_path() == target and converted == [target]


def test_a_damaged_model_file_is_a_one_line_load_error(tiny_dir, tmp_path):
    import shutil

    damaged = tmp_path / "model"
    shutil.copytree(tiny_dir, damaged)
    (damaged / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(steer.SteerError, match="cannot load a causal LM from") as info:
        steer.load_model(damaged)
    assert "\n" not in str(info.value)
