"""Ctrl-C while an entry point's imports load (torch and DeepSpeed take seconds): exit
status 130, never a traceback.

Catching KeyboardInterrupt around the imports is not enough: an interrupt that lands inside a
library's import can be caught there and resurface as another error (numpy's "cannot load
module more than once per process"). So the entry points exit from the signal handler itself
while they import, and restore Python's handler (KeyboardInterrupt) once they are loaded:

    from gpt.interrupt import exit_on_interrupt, interrupt_as_usual

    exit_on_interrupt()
    from gpt.cli.train import main  # the slow imports
    interrupt_as_usual()

Importing this module loads nothing but the standard library.
"""

import os
import signal

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def _exit(signum, frame) -> None:
    os.write(2, b"\n")  # end the shell's ^C line
    os._exit(INTERRUPTED)  # nothing to flush: nothing has run yet


def exit_on_interrupt() -> None:
    """From now on Ctrl-C (SIGINT) exits at once with status 130."""
    signal.signal(signal.SIGINT, _exit)


def interrupt_as_usual() -> None:
    """Ctrl-C raises KeyboardInterrupt again (the loaded program handles it)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
