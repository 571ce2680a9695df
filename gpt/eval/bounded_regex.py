"""Regular expressions from task files, run on model output with a time limit.

A task file's ``output_regex`` is untrusted: Python's ``re`` backtracks, so a pattern such as
``(a+)+$`` takes time exponential in the length of a string of 'a's that does not end the
way it wants, and ``re`` cannot be interrupted from Python (it holds the GIL; signals wait for
it to return). So the search runs in a child Python process (the standard library only:
``python -I -S``, no torch, started in ~20 ms once and reused) and a search that has not
answered after the limit is abandoned: the child is killed, ``RegexTimeout`` raised, and the
next search starts a fresh child. A search costs one round trip through a pipe (tens of
microseconds); the limit bounds the search alone, never the child's start.
"""

from __future__ import annotations

import atexit
import json
import queue
import subprocess
import sys
import threading

REGEX_TIMEOUT_S = 1.0  # per search; a legitimate pattern on a model's answer takes microseconds
START_TIMEOUT_S = 60.0  # for the child to start (a loaded machine), not counted in the limit

# the child: one JSON request per line, [pattern, text]; one JSON reply per line,
# ["ok", text of the answer group or null for no match] or ["error", message]
_CHILD = r"""
import json, re, sys
sys.stdout.write('"ready"\n'); sys.stdout.flush()
for line in sys.stdin:
    pattern, text = json.loads(line)
    try:
        m = re.search(pattern, text)
        # as re.findall: the one group's text if the pattern has exactly one group
        reply = ["ok", None if m is None else m.group(1 if m.re.groups == 1 else 0) or ""]
    except Exception as err:
        reply = ["error", f"{type(err).__name__}: {err}"]
    sys.stdout.write(json.dumps(reply) + "\n"); sys.stdout.flush()
"""


class RegexTimeout(Exception):
    """A search ran past its time limit (and was stopped)."""


class _Child:
    """The child process; started by the first search. A thread moves its replies into a
    queue, so that waiting for one can time out (portably, unlike select on a pipe)."""

    proc: subprocess.Popen | None = None
    replies: queue.Queue = queue.Queue()

    @classmethod
    def start(cls) -> subprocess.Popen:
        if cls.proc is not None and cls.proc.poll() is None:
            return cls.proc
        cls.stop()
        cls.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        cls.replies = queue.Queue()
        threading.Thread(target=cls._forward, args=(cls.proc, cls.replies), daemon=True).start()
        try:
            ready = cls.reply(START_TIMEOUT_S)
        except RegexTimeout:
            ready = None
        if ready != "ready":
            cls.stop()
            raise RuntimeError(
                f"the regular-expression worker ({sys.executable} -I -S) did not start within "
                f"{START_TIMEOUT_S:.0f} s"
            )
        return cls.proc

    @staticmethod
    def _forward(proc: subprocess.Popen, replies: queue.Queue) -> None:
        with proc.stdout:
            for line in proc.stdout:
                replies.put(line)
        replies.put(b"")  # end of file: the child exited or was killed

    @classmethod
    def reply(cls, timeout: float):
        """The child's next reply, decoded; ``RegexTimeout`` if none comes within ``timeout``."""
        try:
            line = cls.replies.get(timeout=timeout)
        except queue.Empty:
            raise RegexTimeout from None
        if not line:
            raise RuntimeError("the regular-expression worker exited unexpectedly")
        return json.loads(line)

    @classmethod
    def stop(cls) -> None:
        if cls.proc is not None:
            cls.proc.kill()
            cls.proc.wait()
            cls.proc.stdin.close()
            cls.proc = None


atexit.register(_Child.stop)


def search(pattern: str, text: str, timeout: float | None = None) -> str | None:
    """The text of the first match of ``pattern`` in ``text`` (its group if it has exactly one,
    as ``re.findall``), or None if it does not match; ``RegexTimeout`` if the search takes
    longer than ``timeout`` seconds (default ``REGEX_TIMEOUT_S``)."""
    timeout = REGEX_TIMEOUT_S if timeout is None else timeout
    proc = _Child.start()
    try:
        proc.stdin.write(json.dumps([pattern, text]).encode() + b"\n")
        proc.stdin.flush()
        status, value = _Child.reply(timeout)
    except RegexTimeout:
        _Child.stop()  # still backtracking: only killing it stops it
        raise
    except (OSError, ValueError, RuntimeError) as err:  # the child died (e.g. out of memory)
        _Child.stop()
        raise RuntimeError(f"the regular-expression worker failed: {err}") from None
    if status != "ok":
        raise ValueError(f"output_regex {pattern!r}: {value}")
    return value
