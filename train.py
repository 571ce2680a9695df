"""Pretrain a GPT: ``python train.py CONFIG.toml [--section.key=value ...]``.

Runs as one process (CPU or one GPU) with no launcher, or under ``deepspeed`` / ``torchrun``
with N processes; always through a DeepSpeed engine (gpt/train/engine.py). gpt/cli/train.py
checks the config and builds the ``Trainer``; its loop is ``Trainer.fit`` in
gpt/train/trainer.py. Running the same command again resumes from the latest complete
checkpoint in ``train.out_dir``.

Exit status: 0 finished; 2 bad configuration; 3 aborted after too many consecutive
non-finite steps; 4 a checkpoint or metrics.jsonl could not be written (disk full); 5
stopped at train.time_limit; 128 + signal number (130 SIGINT, 138 SIGUSR1, 143 SIGTERM)
when stopped by a signal. 5 and 128 + N come after saving a checkpoint, on every rank
(docs/cluster.md).
"""

import sys

from gpt.interrupt import exit_on_interrupt, interrupt_as_usual

exit_on_interrupt()  # Ctrl-C while the imports load (seconds): status 130, not a traceback
import torch.distributed as dist  # noqa: E402

from gpt.cli.train import main  # noqa: E402

interrupt_as_usual()

if __name__ == "__main__":
    status = main(sys.argv[1:])
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(status)
