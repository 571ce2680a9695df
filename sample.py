"""Sample from a GPT, build few-shot prompts, evaluate in context, draw attention maps.

    python sample.py --ckpt PATH [--prompt TEXT] [--num-samples N] [--max-new-tokens N] ...
    python sample.py --ckpt PATH --eval TASK_FILE [--shots K] [--out results.json]

Every option: ``python sample.py --help``; the code is in gpt/cli/sample.py.
"""

import sys

try:  # Ctrl-C while the imports load (seconds): an exit status, not a traceback
    from gpt.cli.sample import main
except KeyboardInterrupt:
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
