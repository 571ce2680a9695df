"""The vertical fine-tuning recipe: four ways to adapt a base model, and what each forgets.

    python recipes/finetune.py [--config configs/finetune-pydocs.toml] [--out DIR] [-- OVERRIDES]

Runs ``train.py CONFIG`` four times (full fine-tuning; LoRA; frozen embeddings and first two
blocks; full fine-tuning with 10% replay of the general data), each from the same base
(``train.init_from``), then writes into ``--out`` a table (results.md, results.json): the
domain and general validation losses before (step 0) and after, the trainable parameters,
the wall time, and the forgetting (the general loss's increase); and one plot (curves.png)
with every run's domain and general curves. ``make finetune`` prepares the data, pretrains
the base (configs/literature.toml) and runs this. Extra ``--section.key=value`` arguments
after ``--`` go to every run (e.g. ``-- --train.max_steps=20`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "full": [],
    "lora": ["--finetune.lora_rank=16", "--finetune.lora_alpha=16.0", "--optim.lr=3e-3"],
    "freeze": ["--finetune.freeze_embeddings=true", "--finetune.freeze_blocks=2"],
    "replay": ["--finetune.replay_dir=out/data/literature", "--finetune.replay_fraction=0.1"],
}


def run(config: str, name: str, runs: Path, extra: list[str]) -> dict:
    out = runs / name
    shutil.rmtree(out, ignore_errors=True)  # this script's own run: start it afresh
    args = [sys.executable, "train.py", config, f"--train.out_dir={out}", *METHODS[name], *extra]
    start = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss/general" in r]
    info = json.loads((out / "run.json").read_text())
    return {
        "method": name,
        "overrides": METHODS[name],
        "trainable_params": info["trainable_params"],
        "params": info["params"],
        "seconds": seconds,
        "steps": records[-1]["step"],
        "domain_before": evals[0]["val_loss/domain"],
        "domain_after": evals[-1]["val_loss/domain"],
        "general_before": evals[0]["val_loss/general"],
        "general_after": evals[-1]["val_loss/general"],
        "forgetting": evals[-1]["val_loss/general"] - evals[0]["val_loss/general"],
        "curve": [(r["step"], r["val_loss/domain"], r["val_loss/general"]) for r in evals],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable params | domain loss before -> after | general loss before -> "
        "after | forgetting | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = 100 * r["trainable_params"] / r["params"]
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} ({share:.1f}%) | "
            f"{r['domain_before']:.3f} -> {r['domain_after']:.3f} | "
            f"{r['general_before']:.3f} -> {r['general_after']:.3f} | "
            f"{r['forgetting']:+.3f} | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(rows):
        steps, domain, general = zip(*r["curve"], strict=True)
        color = f"C{i}"
        ax.plot(steps, domain, "o-", color=color, label=f"{r['method']}: domain")
        ax.plot(steps, general, "s--", color=color, label=f"{r['method']}: general")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python recipes/finetune.py", description=__doc__)
    p.add_argument("--config", default="configs/finetune-pydocs.toml")
    p.add_argument("--runs", default="out/finetune", help="where the four runs go")
    p.add_argument("--out", default="out/finetune", help="where the table and plot go")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = p.parse_args(own)
    rows = [run(args.config, name, Path(args.runs), extra) for name in args.methods]
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "results.md").write_text(table(rows))
    plot(rows, out / "curves.png")
    print(table(rows))
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
