#!/usr/bin/env bash
# Issue 17 on one H100 in one call of at most 10 minutes: the kernels' GPU tests, a parallel
# compile warm-up, and the issue's shapes timed for sdpa-flash, sdpa-cudnn, triton and
# triton-hopper (bf16), every stage under its own time limit so that a slow one cannot eat
# the others. Results: $OUT/kernels-results.tar.gz (one directory per sweep, as
# gpt.kernels.bench writes it, plus the test report), $OUT/summary-*.md, $OUT/log.txt.
#
#   OUT=/tmp/k17 bash bench/gpu/kernels.sh       # any CUDA machine, from the repository root
#   EXTRA=1 ...                                 # also: persistent launch, pointer loads
#   CAUSAL="1x2x64x16" FULL="1x2x64x16" ...     # other shapes (a dry run on a CPU, say)
#
# The package is used in place, not installed (the machine may have no network): gpt/ with
# kernels/ and data/ linked in as gpt.kernels and gpt.data. Python: $PYTHON or python3.
set -u
OUT=${OUT:-out/gpu-kernels}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/k17.XXXX)
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1

mkdir -p "$WORK/pkg/gpt"
for f in "$PWD"/gpt/*; do ln -s "$f" "$WORK/pkg/gpt/"; done
ln -s "$PWD/kernels" "$WORK/pkg/gpt/kernels"
ln -s "$PWD/data" "$WORK/pkg/gpt/data"
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"

START=$(date +%s)
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log its status and time
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "=== $name (limit ${limit} s, ${t0}s - ${START}s = $((t0 - START)) s into the run)"
  timeout "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $(($(date +%s) - t0)) s"
}

# issue 17's table, then GPT-2 124M's attention (D = 64, T = 1024) and D = 64 at T = 4096
read -r -a CAUSAL <<< "${CAUSAL:-4x16x4096x128 16x16x1024x128 1x16x16384x128 4x32/8x4096x128 2x12x1000x128 16x12x1024x64 4x16x4096x64}"
read -r -a FULL <<< "${FULL:-4x16x4096x128 4x16x4096x64}"
BACKENDS=(sdpa-flash sdpa-cudnn triton triton-hopper)
BENCH=("$PY" -m gpt.kernels.bench --dtypes bf16 --no-progress)

stage environment 20 sh -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'; git log -1 --oneline"
# every autotune candidate of every kernel these shapes need, compiled by 16 processes
stage warmup 120 "$PY" -m gpt.kernels.warmup --shapes "${CAUSAL[@]}" --masks causal full \
  --dtypes bf16 --jobs 16
# correctness first: bf16 against float64, long, ragged, GQA, decode and chunked prefill
stage tests 140 env GPT_FLASH_TUNE=quick "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_flash_attention.py tests/test_flash_attention_hopper.py tests/test_warmup.py \
  --junitxml "$WORK/tests.xml"
stage causal 200 "${BENCH[@]}" --backends "${BACKENDS[@]}" --masks causal \
  --shapes "${CAUSAL[@]}" --out "$WORK/causal"
stage full 70 "${BENCH[@]}" --backends "${BACKENDS[@]}" --masks full --shapes "${FULL[@]}" \
  --out "$WORK/full"
if [ "${EXTRA:-0}" = 1 ]; then  # triton-hopper variants, on the causal D = 128 shapes
  stage persistent 60 env GPT_FLASH_PROGRAMS_PER_SM=2 "${BENCH[@]}" --backends triton-hopper \
    --masks causal --shapes "${CAUSAL[@]:0:5}" --out "$WORK/persistent"
  stage pointers 60 env GPT_FLASH_TMA=0 "${BENCH[@]}" --backends triton-hopper \
    --masks causal --shapes "${CAUSAL[@]:0:5}" --out "$WORK/pointers"
fi

for d in "$WORK"/*/; do
  [ -f "$d/summary.md" ] && cp "$d/summary.md" "$OUT/summary-$(basename "$d").md"
done
tar czf "$OUT/kernels-results.tar.gz" -C "$WORK" --exclude pkg .
echo "=== done in $(($(date +%s) - START)) s; files in $OUT:"
ls -l "$OUT"
