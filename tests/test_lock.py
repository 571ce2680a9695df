"""gpt/train/lock.py: one job per run directory. A held lock refuses the next job naming its
holder; a lock whose holder died (a record but no flock) is taken over and its record kept
as ``previous``; a released lock leaves no holder behind. (The trainer's use of it, exit
status 2 before the process group starts, is in test_reliability.py.)"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from gpt.train.lock import LOCK, RunLock, RunLocked

HOLD = """
import sys
from gpt.train.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def record(out) -> dict:
    return json.loads((out / LOCK).read_text())


def test_acquire_creates_the_directory_and_records_the_holder(tmp_path):
    out = tmp_path / "new" / "run"
    lock = RunLock(out)
    lock.acquire()
    assert sorted(p.name for p in out.iterdir()) == [LOCK]
    held = record(out)
    assert set(held) == {"host", "pid", "since"}
    assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
    assert lock.previous is None  # a fresh directory: nobody before us
    lock.release()


def test_a_held_lock_refuses_the_next_job_naming_the_holder(tmp_path):
    """flock conflicts between two open files even in one process: the second RunLock is
    refused while the first holds, and takes it once the first releases."""
    first = RunLock(tmp_path)
    first.acquire()
    held = record(tmp_path)
    with pytest.raises(RunLocked) as err:
        RunLock(tmp_path).acquire()
    message = str(err.value)
    assert message.startswith(f"{tmp_path}: the run directory is in use by another job")
    who = f"host {held['host']}, pid {held['pid']}, since {held['since']}"
    assert who in message and "choose another train.out_dir" in message
    assert record(tmp_path) == held  # the refused job did not touch the record
    first.release()
    second = RunLock(tmp_path)
    second.acquire()
    assert second.previous is None  # a released lock leaves no holder behind
    second.release()


def test_a_holder_that_recorded_nothing_is_another_process(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    (tmp_path / LOCK).write_text("")  # the holder's record gone (by hand, or not yet written)
    with pytest.raises(RunLocked, match=r"in use by another job \(another process\)"):
        RunLock(tmp_path).acquire()
    first.release()


def test_release_empties_the_record_unlocks_and_may_be_repeated(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
    assert (tmp_path / LOCK).read_text() == ""
    lock.release()  # a second release does nothing
    again = RunLock(tmp_path)
    again.acquire()
    assert again.previous is None
    again.release()


@pytest.mark.parametrize("text", ["", "   \n", "{damaged", "[]"], ids=repr)
def test_a_lock_file_without_a_readable_record_is_taken_silently(tmp_path, text):
    (tmp_path / LOCK).write_text(text)
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.previous is None
    assert record(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_a_stale_lock_left_by_a_killed_job_is_taken_over_and_its_holder_kept(tmp_path):
    """kill -9 runs no clean-up: the record stays, the kernel drops the flock. The next job
    takes the lock, keeps the dead holder as ``previous`` and records itself (one line,
    nothing of the old record left behind)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    dead = record(tmp_path)
    assert dead["pid"] == holder.pid
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.previous == dead
    assert record(tmp_path)["pid"] == os.getpid()
    assert (tmp_path / LOCK).read_text().count("\n") == 0
    lock.release()


def test_a_longer_stale_record_is_replaced_whole(tmp_path):
    long = {"host": "h" * 500, "pid": 1, "since": "then"}
    (tmp_path / LOCK).write_text(json.dumps(long))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.previous == long
    assert record(tmp_path)["host"] == socket.gethostname()  # truncated first: valid JSON
    lock.release()
