"""gpt/train/engine.py: where DeepSpeed's just-in-time op build goes."""

import dataclasses
import re
import sys
from pathlib import Path

import pytest

from gpt.config_io import load_config
from gpt.train import engine


def test_the_op_build_stays_with_the_installation(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    engine.use_own_extensions_dir()
    assert engine.os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")


def test_a_directory_the_user_chose_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    engine.use_own_extensions_dir()
    assert engine.os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)


ZERO_RUNS = """
import sys, tomllib
from pathlib import Path
from gpt.cli.train import main
stage, data, tmp, *configs = sys.argv[1:]
SHRINK = ["--model.vocab_size=257", "--model.n_layer=1", "--model.n_head=2",
          "--model.n_embd=32", "--model.block_size=16"]
for path in configs:
    cfg = tomllib.loads(Path(path).read_text())
    name = Path(path).stem
    args = [path, f"--data.dir={data}", f"--train.out_dir={tmp}/{name}", "--train.max_steps=1",
            "--train.micro_batch_size=2", "--train.eval_interval=0", "--train.ckpt_interval=1",
            "--train.wandb=false", "--train.compile=false", "--train.sample_tokens=0",
            "--data.extra_val={}", f"--deepspeed.zero_optimization.stage={stage}"]
    if mixture := cfg.get("data", {}).get("mixture"):  # every source read from the test's set
        args.append("--data.sources={" + ", ".join(f'{k} = "{data}"' for k in mixture) + "}")
    batch = "global_batch_size" if "global_batch_size" in cfg["train"] else "grad_accum"
    args.append(f"--train.{batch}={2 if batch == 'global_batch_size' else 1}")
    if "init_from" in cfg["train"]:  # fine-tuning: from the shrunk tiny run, its shape
        args.append(f"--train.init_from={tmp}/tiny")
    else:
        args += SHRINK
    print("config", name, flush=True)
    status = main(args)
    print("status", name, status, flush=True)
    if status:
        sys.exit(status)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_runs_every_shipped_config(stage, tmp_path, data_dir):
    """Every shipped config pads the vocabulary (vocab_multiple = 64), which ZeRO-3 once
    crashed on (a partitioned parameter's shape read) or counted as 0 parameters. Each config
    runs one step at each stage, shrunk to a tiny model, with its true parameter count."""
    from runs import ROOT, run_script

    from gpt.model import GPT

    configs = sorted((ROOT / "configs").glob("*.toml"), key=lambda p: p.stem != "tiny")
    proc = run_script(
        ["-c", ZERO_RUNS, str(stage), str(data_dir), str(tmp_path), *map(str, configs)]
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out[-2000:], err[-3000:])
    counts = re.findall(r"starting: ([\d,]+) parameters \(([\d,]+) trainable\)", out)
    shrunk = dict(vocab_size=257, n_layer=1, n_head=2, n_embd=32, block_size=16)

    def expected(path) -> int:
        if "init_from" in path.read_text():  # fine-tuned from the shrunk tiny run
            path = ROOT / "configs" / "tiny.toml"
        return GPT(dataclasses.replace(load_config(path).model, **shrunk)).num_params()

    want = [f"{expected(p):,}" for p in configs]
    assert counts == [(n, n) for n in want], (counts, want)  # all trainable: no freezing
    assert all(
        load_config(p).model.vocab_multiple == 64 for p in configs if p.stem != "finetune-pydocs"
    )


def test_step_health_hands_each_steps_verdict_out_once():
    """GuardedAdamW's device flag is read once; a step a DeepSpeed wrapper (fp16) skipped
    before calling the optimizer reports the wrapper's own host flag, not the last step's."""
    import torch

    from gpt.train.engine import Engine

    class Wrapper:  # what DeepSpeed's fp16 optimizer shows the engine
        overflow = False

    class DS:
        optimizer = Wrapper()

        def get_global_grad_norm(self):
            return 0.5

    class Ours:
        skipped = torch.tensor(1.0)

    engine = Engine.__new__(Engine)
    engine.ds, engine.optimizer = DS(), Ours()
    skipped, norm = engine.step_health()
    assert skipped.item() == 1.0 and norm == 0.5
    assert engine.step_health() == (0.0, 0.5)  # the wrapper skipped: no stale flag
    DS.optimizer.overflow = True
    assert engine.step_health() == (1.0, 0.5)
