"""Evaluate a GPT in context on task files (BIG-bench task.json, JSONL) at several shot counts.

    python -m gpt.eval --ckpt PATH --tasks TASKS [TASKS ...] [--shots K [K ...]] [--limit N]
        [--out results.json]

Every option: ``python -m gpt.eval --help``; the code is in gpt/cli/evaluate.py.
"""

import sys

from gpt.interrupt import exit_on_interrupt, interrupt_as_usual

exit_on_interrupt()  # Ctrl-C while the imports load (seconds): status 130, not a traceback
from gpt.cli.evaluate import main  # noqa: E402

interrupt_as_usual()

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
