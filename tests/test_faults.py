"""Fault injection: processes killed with SIGKILL at unlucky moments (while a checkpoint is written, at
random points of training, while a model is converted, while a report is written) lose nothing: the
next run resumes to the same result, and every file is the old one or the new one, never a part."""

import json
import os
import random
import resource
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


def complete_checkpoints(out: Path) -> list[str]:
    return [d.name for d in out.glob("checkpoint-*") if (d / "trainer_state.json").exists()]


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
    for _ in range(2):  # then at seeded moments of resumed runs' training steps: after a new checkpoint
        delay = rng.uniform(0.0, 1.0)
        before = set(complete_checkpoints(out))
        run = start(dpo(tiny_text_dir, arithmetic_pairs, out, "--resume"))
        seen: list[float] = []

        def in_training() -> bool:
            if not seen and set(complete_checkpoints(out)) - before:
                seen.append(time.monotonic())  # the resumed run is past start-up, taking steps
            return bool(seen) and time.monotonic() - seen[0] > delay

        killed = kill_when(run, in_training)
        assert killed or json.loads((out / "metrics.json").read_text())  # (or it finished first)
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


def test_the_conversion_parses_the_gguf_file_once(tmp_path):
    """The tokenizer, the config and the weights share one parse of the file (each took 20 s)."""
    import gguf
    import numpy as np

    from steer.lm.loading import _gguf_parsed_once

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("test.value", 7)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    original = gguf.GGUFReader
    with _gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and first.fields["test.value"].contents() == 7
        assert type(first.data) is np.ndarray  # read into memory: slices of a memory map run Python hooks
    assert gguf.GGUFReader is original and gguf.GGUFReader(path) is not first


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


def test_two_processes_converting_into_an_empty_cache_convert_once(tmp_path):
    """Two first runs at once: one converts, the other waits for it and loads the same model."""
    cache = tmp_path / "cache"
    script = ("import logging, steer.lm.loading as l; logging.basicConfig(level=logging.INFO); "
              "print(l.default_model_path())")
    first, second = (subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env={**ENV, "STEER_CACHE": str(cache)})
                     for _ in range(2))
    outputs = [p.communicate(timeout=900) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [err[-2000:] for _, err in outputs]
    assert {out.strip() for out, _ in outputs} == {str(cache / "models" / "gemma-3-270m")}
    assert sum("converting the default model" in err for _, err in outputs) == 1
    from steer.lm.loading import _intact

    assert _intact(cache / "models" / "gemma-3-270m")
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".convert-")]


# -- a full disk -------------------------------------------------------------------------------------
# A process whose files may not grow past a size: its writes fail as on a full disk (EFBIG where a
# full disk gives ENOSPC), through the same code paths.  It needs no privileges, so it runs everywhere;
# a real small file system (a tmpfs) would need root to mount.


def limited(size: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    return apply


def cli(args: list[str], size: int | None = None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steer.cli", *args], capture_output=True, text=True,
                          env={**ENV, **env}, preexec_fn=limited(size) if size else None, timeout=900)


def one_line_write_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr.strip()
    assert "\n" not in err and err.startswith("steer: error: File too large"), err
    return err


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TEMPORARY)]


def test_a_full_disk_during_run_trace_keeps_the_earlier_trace(tiny_dir, tmp_path):
    program = tmp_path / "p.steer"
    program.write_text('context c = "a"\nrepeat 6:\n    t = sample next(c)\nresult text(c)\n')
    trace = tmp_path / "trace.html"
    args = ["run", str(program), "--model", str(tiny_dir), "-n", "8", "--trace", str(trace)]
    cache = {"STEER_CACHE": str(tmp_path / "cache")}
    assert cli(args, **cache).returncode == 0
    before = trace.read_bytes()
    err = one_line_write_error(cli([*args, "--seed", "1"], size=len(before) // 2, **cache))
    assert str(trace.parent) in err
    assert trace.read_bytes() == before and not leftovers(tmp_path)


def test_a_full_disk_during_training_leaves_no_half_model(tiny_text_dir, arithmetic_pairs, tmp_path):
    out = tmp_path / "dpo"
    args = ["train", "dpo", "--data", str(arithmetic_pairs), "--model", str(tiny_text_dir), "--out", str(out),
            "--max-steps", "2", "--batch-size", "4", "--max-length", "64", "--save-steps", "100", "--no-progress"]
    one_line_write_error(cli(args, size=64_000))
    assert not (out / "model").exists()  # the model folder appears whole or not at all
    assert cli(args).returncode == 0  # with room again, the same command finishes
    assert steer.load_model(out / "model").vocab.size > 0 and not leftovers(out)


def test_a_full_disk_or_a_kill_during_index_build_keeps_the_earlier_index(wiki_docs, tmp_path):
    from retrieval.retriever import Retriever

    out = tmp_path / "index"
    build = ["index", "build", "--docs", str(wiki_docs), "--out", str(out), "--no-progress"]
    assert cli(build).returncode == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_write_error(cli([*build, "--kind", "hnsw"], size=40_000))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files

    process = start(["-m", "steer.cli", *build, "--kind", "hnsw"])
    staged = lambda: any(p.name.startswith(TEMPORARY) and (p / "embeddings.npy").exists()  # noqa: E731
                         for p in tmp_path.iterdir())
    assert kill_when(process, staged)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # killed mid-build: the old index
    assert leftovers(tmp_path)
    assert cli([*build, "--kind", "hnsw"]).returncode == 0  # rebuilt, and the killed build's folder gone
    assert not leftovers(tmp_path)
    assert json.loads((out / "index.json").read_text())["kind"] == "hnsw"
    assert Retriever.load(out).search("anarchism", k=1)[0].title == "Anarchism"


def test_a_full_disk_during_conversion_leaves_no_model(tmp_path):
    cache = tmp_path / "cache"
    result = cli(["generate", "--prompt", "a", "-t", "1", "-n", "1"], size=50_000_000, STEER_CACHE=str(cache))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]  # (the lines before it: the conversion's progress bars)
    assert last.startswith(f"steer: error: cannot write the converted default model into {cache / 'models'}: "
                           "File too large"), last
    models = cache / "models"
    assert not (models / "gemma-3-270m").exists()
    assert not [p for p in models.iterdir() if p.name.startswith(".convert-")]
