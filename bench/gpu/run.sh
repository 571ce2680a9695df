#!/usr/bin/env bash
# Issues 11 and 17 on one H100 in one call of at most 10 minutes: the trainer's throughput
# table and the attention kernels' sweep. Every stage has its own time limit and the whole
# run a deadline (BUDGET seconds, default 540), so that a slow stage cannot eat the others;
# stages run most important first, and those the deadline leaves no time for are skipped.
#
#   bash bench/gpu/wheels.sh                          # HERE first, with PyPI: builds .whl/
#   OUT=/tmp/gpu bash bench/gpu/run.sh                # on the GPU machine, carrying .whl
#   OUT=/tmp/gpu bash bench/gpu/run.sh causal full    # only these stages
#   OUT=/tmp/gpu bash bench/gpu/run.sh data levers    # issue 26's levers (below)
#   OUT=/tmp/gpu bash bench/gpu/run.sh long           # issue 24's rows at T = 16k and 32k
#   CONFIG=configs/tiny.toml STEPS=1 WARMUP=1 COMPILE=false CAUSAL=1x2x64x16 FULL=1x2x64x16 \
#     PYTHON=.venv/bin/python OUT=/tmp/gpu bash bench/gpu/run.sh   # a dry run on a CPU
#
# Stages, in order:
#   data           random bytes, prepared on the machine (throughput does not depend on text)
#   bench-sdpa     bench/trainer.py, GPT-2 124M, T = 1024, micro-batch 16, bf16 autocast, compiled:
#                  the engine beside the bare loop (vs_bare, MFU)                (issue 11)
#   eval-eager     a compiled run with evaluations and samples: step time before and after
#                  the first evaluation (the trainer evaluates on the uncompiled module)
#   warmup         every Triton autotune candidate of the shapes below, compiled by 16 processes
#   causal, full   bench/attention.py on issue 17's shapes, GPT-2's (D = 64, T = 1024) and
#                  D = 64 at T = 4096: sdpa-flash, sdpa-cudnn, triton, triton-packed-gqa (bf16)
#                  (causal before full, bench-triton between them)
#   bench-triton, bench-hopper   as bench-sdpa, triton and triton-packed-gqa backends
#   tests          the kernels' GPU tests (GPT_FLASH_TUNE=quick): bf16 against float64
#   eval-through   as eval-eager, evaluating through the compiled module (the old way)
#   bench-ds-bf16  bench-sdpa with DeepSpeed's bf16 section (bf16 weights and its wrapper)
#   bench-eager    bench-sdpa uncompiled (the eager-model comparison)
#   levers         issue 26, each lever alone, each stage timing the engine beside the bare
#                  loop in its own run (not in the default list):
#     bench-flash       sdpa with FlashAttention-2 first (model.sdpa_kernels; cuDNN never)
#     bench-cudnn       sdpa with cuDNN first, then flash, efficient, math
#     bench-micro32     micro-batch 32 (32,768 tokens a step: the optimizer pass amortised;
#                       about 38 GiB by gpt/memory.py's estimate, 64 would be 75 GiB)
#     bench-loss-chunk  the chunked LM-head loss, model.loss_chunk = $LOSS_CHUNK (gpt/loss.py)
#     bench-combined    all three: cuDNN first, micro-batch 32, chunked loss (about 16 GiB)
#                  every bench JSON records the SDPA kernel that ran ("sdpa": gpt/sdpa.py)
#   long           issue 24: bench/attention.py, causal, every backend usable there (naive
#                  included: a row it cannot fit says so) at T = 16,384 and 32,768 ($LONG;
#                  not in the default list)
# Results: $OUT/log.txt, $OUT/results.tar.gz (every stage's files), $OUT/summary-*.md.
# Python: $PYTHON or python3.
set -u
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/gpt2-124m.toml}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
COMPILE=${COMPILE:-true}
LOSS_CHUNK=${LOSS_CHUNK:-4096}
read -r -a CAUSAL <<< "${CAUSAL:-4x16x4096x128 16x16x1024x128 1x16x16384x128 4x32/8x4096x128 2x12x1000x128 16x12x1024x64 4x16x4096x64}"
read -r -a FULL <<< "${FULL:-4x16x4096x128 4x16x4096x64}"
read -r -a LONG <<< "${LONG:-1x16x16384x128 1x16x32768x128 1x12x16384x64 1x12x32768x64}"
ALL=(data bench-sdpa eval-eager warmup causal bench-triton full bench-hopper tests
  eval-through bench-ds-bf16 bench-eager)
LEVERS=(bench-flash bench-cudnn bench-micro32 bench-loss-chunk bench-combined)
STAGES=("${@:-${ALL[@]}}")
WORK=$(mktemp -d /tmp/gpu.XXXX)
mkdir -p "$OUT" "$WORK/res"
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
# not installed: the repository's gpt/ holds kernels/ and data/ as committed links, and the
# root goes first on PYTHONPATH
export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"

START=$(date +%s)
DEADLINE=$((START + ${BUDGET:-540}))
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log its status and time
  local name=$1 limit=$2 t0 left
  shift 2
  t0=$(date +%s)
  left=$((DEADLINE - t0))
  if [ "$left" -lt 20 ]; then
    echo "=== $name: skipped, ${left} s left before the deadline"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "=== $name (limit ${limit} s, $((t0 - START)) s into the run)"
  timeout "$limit" "$@"
  echo "=== $name: exit $? after $(($(date +%s) - t0)) s"
  find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2> /dev/null
  tar czf "$OUT/results.tar.gz" -C "$WORK/res" .  # after every stage: a cut run keeps its results
}

TRAINER=("$PY" bench/trainer.py "$CONFIG" --steps "$STEPS" --warmup "$WARMUP"
  "--data.dir=$WORK/data/bytes" --train.micro_batch_size=16 --train.global_batch_size=16
  --train.dtype=bf16 --train.wandb=false)
bench() {  # bench NAME SECONDS ARGS...: one bench/trainer.py run, its JSON kept
  local name=$1 limit=$2
  shift 2
  stage "$name" "$limit" "${TRAINER[@]}" --out "$WORK/$name" "$@"
  cp "$WORK/$name/bench.json" "$WORK/res/$name.json" 2> /dev/null
}
EVAL=("$PY" bench/compiled_eval.py "$CONFIG" --steps 45 --eval-interval 15
  "--data.dir=$WORK/data/bytes" --train.micro_batch_size=16 --train.dtype=bf16
  --train.global_batch_size=16 --train.eval_steps=5 --train.sample_tokens=32)
# issue 26's levers: the SDPA kernel order (gpt/sdpa.py) and micro-batch 32 (the global
# batch follows it: one micro-batch a step, as in the micro-batch 16 rows)
FLASH_FIRST='--model.sdpa_kernels=["flash","efficient","math"]'
CUDNN_FIRST='--model.sdpa_kernels=["cudnn","flash","efficient","math"]'
MICRO32=(--train.micro_batch_size=32 --train.global_batch_size=32)
KERNELS=("$PY" bench/attention.py --dtypes bf16 --no-progress
  --backends sdpa-flash sdpa-cudnn triton triton-packed-gqa)

run_stage() {
  case $1 in
    data) stage data 60 "$PY" - "$WORK/data" <<'PYTHON' ;;
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
    bench-sdpa) bench bench-sdpa 150 --backends sdpa --compile "$COMPILE" ;;
    bench-triton) bench bench-triton 100 --backends triton --compile "$COMPILE" ;;
    bench-hopper) bench bench-hopper 100 --backends triton-packed-gqa --compile "$COMPILE" ;;
    bench-ds-bf16) bench bench-ds-bf16 100 --backends sdpa --compile "$COMPILE" \
      --deepspeed.bf16.enabled=true ;;
    bench-eager) bench bench-eager 60 --backends sdpa --compile false ;;
    levers) for lever in "${LEVERS[@]}"; do run_stage "$lever"; done ;;
    bench-flash) bench bench-flash 100 --backends sdpa --compile "$COMPILE" "$FLASH_FIRST" ;;
    bench-cudnn) bench bench-cudnn 100 --backends sdpa --compile "$COMPILE" "$CUDNN_FIRST" ;;
    bench-micro32) bench bench-micro32 120 --backends sdpa --compile "$COMPILE" "$FLASH_FIRST" \
      "${MICRO32[@]}" ;;
    bench-loss-chunk) bench bench-loss-chunk 100 --backends sdpa --compile "$COMPILE" \
      "$FLASH_FIRST" "--model.loss_chunk=$LOSS_CHUNK" ;;
    bench-combined) bench bench-combined 120 --backends sdpa --compile "$COMPILE" \
      "$CUDNN_FIRST" "${MICRO32[@]}" "--model.loss_chunk=$LOSS_CHUNK" ;;
    eval-eager) [ "$COMPILE" = true ] &&
      stage eval-eager 110 "${EVAL[@]}" --out "$WORK/res/compiled-eval-eager.json" ;;
    eval-through) [ "$COMPILE" = true ] && stage eval-through 120 "${EVAL[@]}" \
      --through-compiled --out "$WORK/res/compiled-eval-through.json" ;;
    warmup) stage warmup 75 "$PY" -m gpt.kernels.warmup --shapes "${CAUSAL[@]}" \
      --masks causal full --dtypes bf16 --jobs 16 ;;
    causal) stage causal 150 "${KERNELS[@]}" --masks causal --shapes "${CAUSAL[@]}" \
      --out "$WORK/res/causal" ;;
    full) stage full 60 "${KERNELS[@]}" --masks full --shapes "${FULL[@]}" --out "$WORK/res/full" ;;
    long) stage long 240 "$PY" bench/attention.py --dtypes bf16 --no-progress --masks causal \
      --shapes "${LONG[@]}" --out "$WORK/res/long" ;;
    tests) stage tests 150 env GPT_FLASH_TUNE=quick "$PY" -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_flash_attention.py tests/test_flash_attention_packed_gqa.py tests/test_warmup.py \
      --junitxml "$WORK/res/tests.xml" ;;
    *) echo "unknown stage $1; stages: ${ALL[*]} levers ${LEVERS[*]} long" && exit 2 ;;
  esac
}

stage environment 30 sh -c "nvidia-smi; $PY -c 'import torch, triton, deepspeed; \
print(torch.__version__, triton.__version__, deepspeed.__version__, torch.cuda.get_device_name())'"
for s in "${STAGES[@]}"; do run_stage "$s"; done

for d in "$WORK"/res/*/; do
  [ -f "$d/summary.md" ] && cp "$d/summary.md" "$OUT/summary-$(basename "$d").md"
done
tar czf "$OUT/results.tar.gz" -C "$WORK/res" .
echo "=== done in $(($(date +%s) - START)) s"
"$PY" - "$WORK/res" <<'PYTHON'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    data = json.loads(f.read_text())
    rows = data.get("results") if isinstance(data, dict) else None
    sdpa = data.get("sdpa") if isinstance(data, dict) else None
    print(f"--- {f.name}" + (f" (sdpa ran {sdpa['kernel']}, order {sdpa['priority']})" if sdpa else ""))
    for r in rows or []:
        print("  ", {k: v for k, v in r.items() if k in (
            "loop", "attention", "compile", "status", "step_ms", "tokens_per_s", "mfu", "vs_bare")})
    if not rows:
        print("  ", json.dumps(data)[:600])
PYTHON
cat "$OUT"/summary-*.md 2> /dev/null
