#!/usr/bin/env bash
# Issue 11 on one H100 in one call of at most 10 minutes: the trainer's throughput table.
# Every stage has its own time limit, so that a slow one cannot eat the others; results go
# to $OUT (bench-*.json as bench mode writes them, compiled-eval-*.json, log.txt).
#
#   bash bench/gpu/trainer-wheels.sh                 # HERE first, with PyPI: builds .whl/
#   OUT=/tmp/t11 bash bench/gpu/trainer.sh           # on the GPU machine, carrying .whl
#   CONFIG=configs/tiny.toml STEPS=1 WARMUP=1 COMPILE=false PYTHON=.venv/bin/python \
#     OUT=/tmp/t11 bash bench/gpu/trainer.sh      # a dry run of the stages on a CPU
#
# Stages, most important first:
#   1. bench mode, GPT-2 124M, T = 1024, micro-batch 16, bf16 (autocast), compiled: sdpa and
#      triton through the engine, each beside the bare loop (vs_bare, MFU)  -> bench-autocast
#   2. the same for sdpa with DeepSpeed's bf16 section (bf16 weights, its wrapper)
#                                                                          -> bench-ds-bf16
#   3. a compiled run with evaluations and samples: step time before and after the first
#      evaluation, evaluation eager (as the trainer does) and through the compiled module
#                                                                  -> compiled-eval-*.json
#   4. eager (uncompiled) rows, for the eager-model comparison               -> bench-eager
# The package is used in place, not installed: gpt/ with kernels/ and data/ linked in as
# gpt.kernels and gpt.data. Python: $PYTHON or python3. Data: random bytes (throughput does
# not depend on the text), prepared on the machine.
set -u
OUT=${OUT:-out/gpu-trainer}
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/gpt2-124m.toml}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
COMPILE=${COMPILE:-true}  # false: a dry run without compilation (and without stage 3)
WORK=$(mktemp -d /tmp/t11.XXXX)
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
# DeepSpeed builds its ops just in time under a lock file; a stage killed at its time limit
# during a build would leave the lock and hang every later stage: builds stay in $WORK and
# locks are cleared after each stage (the stages run one at a time)
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"

if ! "$PY" -c "import deepspeed" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl || exit 1
fi
mkdir -p "$WORK/pkg/gpt"
for f in "$PWD"/gpt/*; do ln -s "$f" "$WORK/pkg/gpt/"; done
ln -s "$PWD/kernels" "$WORK/pkg/gpt/kernels"
ln -s "$PWD/data" "$WORK/pkg/gpt/data"
export PYTHONPATH="$WORK/pkg:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"

START=$(date +%s)
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log its status and time
  local name=$1 limit=$2 t0
  shift 2
  t0=$(date +%s)
  echo "=== $name (limit ${limit} s, $((t0 - START)) s into the run)"
  timeout "$limit" "$@"
  echo "=== $name: exit $? after $(($(date +%s) - t0)) s"
  find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2> /dev/null
}

stage environment 30 sh -c "nvidia-smi; $PY -c 'import torch, deepspeed; \
print(torch.__version__, deepspeed.__version__, torch.cuda.get_device_name())'"
stage data 60 "$PY" - "$WORK/data" <<'PYTHON'
import random, sys
from pathlib import Path
from gpt.data.prepare import prepare
docs = Path(sys.argv[1]) / "docs"
docs.mkdir(parents=True)
rng = random.Random(0)
for i in range(8):  # 8 x 512 KiB of random printable bytes
    (docs / f"d{i}.txt").write_text("".join(rng.choice("etaoin shrdlu\n") for _ in range(1 << 19)))
prepare([str(docs)], Path(sys.argv[1]) / "bytes", encoding="bytes", progress=False)
PYTHON

TRAIN=("$PY" train.py "$CONFIG" "--data.dir=$WORK/data/bytes" --train.micro_batch_size=16
  --train.grad_accum=1 --train.dtype=bf16 "--bench.steps=$STEPS" "--bench.warmup=$WARMUP")
bench() {  # bench NAME SECONDS OVERRIDES...: one bench-mode run, its JSON copied to $OUT
  local name=$1 limit=$2
  shift 2
  stage "$name" "$limit" "${TRAIN[@]}" "--train.out_dir=$WORK/$name" "$@"
  cp "$WORK/$name/bench.json" "$OUT/$name.json" 2>/dev/null
}
bench bench-autocast 240 '--bench.backends=["sdpa", "triton"]' "--bench.compile=[$COMPILE]"
bench bench-ds-bf16 110 '--bench.backends=["sdpa"]' "--bench.compile=[$COMPILE]" \
  --deepspeed.bf16.enabled=true
EVAL=("$PY" bench/compiled_eval.py "$CONFIG" --steps 45 --eval-interval 15
  "--data.dir=$WORK/data/bytes" --train.micro_batch_size=16 --train.dtype=bf16
  --train.eval_steps=5 --train.sample_tokens=32)
[ "$COMPILE" = true ] && stage compiled-eval-eager 100 "${EVAL[@]}" --out "$OUT/compiled-eval-eager.json"
[ "$COMPILE" = true ] && stage compiled-eval-through 120 "${EVAL[@]}" --through-compiled \
  --out "$OUT/compiled-eval-through.json"
bench bench-eager 60 '--bench.backends=["sdpa"]' '--bench.compile=[false]'
echo "done in $(($(date +%s) - START)) s"
