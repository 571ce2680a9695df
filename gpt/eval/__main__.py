"""Evaluate a GPT in context on task files (BIG-bench task.json, JSONL) at several shot counts.

    python -m gpt.eval --ckpt PATH --tasks TASKS [TASKS ...] [--shots K [K ...]] [--limit N]
        [--out results.json]

Every option: ``python -m gpt.eval --help``; the code is in gpt/cli/evaluate.py.
"""

import sys

try:  # Ctrl-C while the imports load (seconds): an exit status, not a traceback
    from gpt.cli.evaluate import main
except KeyboardInterrupt:
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
