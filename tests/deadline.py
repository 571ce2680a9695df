"""A time limit for a block of test code: for code that, when broken, runs for hours (a
symlink loop walked forever, a regular expression backtracking) rather than failing."""

import signal
from contextlib import contextmanager


@contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in the block if it runs longer than ``seconds`` (SIGALRM: the main
    thread, POSIX; it interrupts Python code, not a C call that never returns to Python)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
