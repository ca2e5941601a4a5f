"""Files written for users appear whole or not at all; temporaries of killed writers are cleaned up."""

import os
import subprocess
import sys

import pytest

from steer.files import atomic_open, atomic_write_text, remove_stale


def test_a_write_that_fails_part_way_keeps_the_old_file_whole(tmp_path):
    target = tmp_path / "trace.html"
    atomic_write_text(target, "complete earlier report")
    with pytest.raises(OSError):
        with atomic_open(target) as f:
            f.write("half of a new rep")
            raise OSError("disk full")
    assert target.read_text() == "complete earlier report"
    assert [p.name for p in tmp_path.iterdir()] == ["trace.html"]  # no temporary left behind


@pytest.mark.slow
def test_a_killed_writer_leaves_no_part_and_its_temporary_is_removed_later(tmp_path):
    target = tmp_path / "order.jsonl"
    atomic_write_text(target, "old\n")
    script = (f"import os, sys; sys.path.insert(0, {os.getcwd()!r}); from steer.files import atomic_open\n"
              f"with atomic_open({str(target)!r}) as f:\n    f.write('new, part'); f.flush(); os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9  # dies mid-write, like kill -9
    assert target.read_text() == "old\n"
    left = [p for p in tmp_path.iterdir() if p.name != "order.jsonl"]
    assert len(left) == 1 and left[0].read_text() == "new, part"
    mine = tmp_path / f".partial-{os.getpid()}-windows.jsonl"  # a live writer's temporary stays
    mine.write_text("in progress")
    assert remove_stale(tmp_path) == left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["order.jsonl", mine.name])
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    atomic_write_text(target, "newer\n")  # the next write of the file clears what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["order.jsonl", mine.name])
