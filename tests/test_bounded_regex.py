"""Task-file regular expressions under a time limit (gpt.eval.bounded_regex): the same answer
as ``re`` in this process, a catastrophic pattern stopped at the limit, and a fresh worker
after a timeout or a crash."""

import os
import re
import signal
import time

import pytest

from gpt.eval import bounded_regex
from gpt.eval.bounded_regex import RegexTimeout, search

CASES = [
    (r"[^\.\?\!\;\n]+", "Paris. Next"),
    (r"[-+]?\d+", "is 42\n7"),
    (r"('.*?')", "x 'ab' 'c'"),  # one group: its text, as re.findall
    (r"(\d)(\d)", "a 12"),  # two groups: the whole match
    (r"(x)?y", "y"),  # the one group did not take part: an empty answer
    (r"\d+", "none"),  # no match
    (r"(?i)PARIS", "paris"),
    ("é+", "caféé \ud800 lone surrogate"),  # any str survives the trip
    (r"\s+$", "trailing   "),
]


def reference(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    if match is None:
        return None
    return match.group(1 if match.re.groups == 1 else 0) or ""


@pytest.mark.parametrize("pattern, text", CASES)
def test_same_answer_as_re_in_this_process(pattern, text):
    assert search(pattern, text) == reference(pattern, text)


def test_catastrophic_backtracking_stops_at_the_limit_and_the_worker_recovers():
    """(a+)+$ on 28 'a's and a 'b' takes ~20 s in re (twice as long per extra 'a')."""
    search("a", "a")  # the worker's start is not part of the limit
    start = time.monotonic()
    with pytest.raises(RegexTimeout):
        search(r"(a+)+$", "a" * 28 + "b", timeout=0.5)
    assert time.monotonic() - start < 3.0
    assert search(r"(\d+)", "abc 123") == "123"  # a fresh worker answers the next search


def test_a_worker_that_dies_is_replaced():
    search("a", "a")
    os.kill(bounded_regex._Child.proc.pid, signal.SIGKILL)
    bounded_regex._Child.proc.wait()
    assert search("b+", "abbc") == "bb"


def test_an_invalid_pattern_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match=r"output_regex '\(': error: missing \)"):
        search("(", "x")
    assert search("x", "x") == "x"
