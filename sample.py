"""Sample from a GPT, from a prompt or a task file's few-shot prompt; draw attention maps.

    python sample.py --ckpt PATH [--prompt TEXT] [--num-samples N] [--max-new-tokens N] ...

Every option: ``python sample.py --help``; the code is in gpt/cli/sample.py. Evaluation on
task files is ``python -m gpt.eval`` (``sample.py --eval ...`` forwards there).
"""

import sys

from gpt.interrupt import exit_on_interrupt, interrupt_as_usual

exit_on_interrupt()  # Ctrl-C while the imports load (seconds): status 130, not a traceback
from gpt.cli.sample import main  # noqa: E402

interrupt_as_usual()

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
