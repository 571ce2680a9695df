#!/usr/bin/env bash
# Wheels that bench/gpu/run.sh needs on the GPU machine and its image lacks (DeepSpeed
# and what it requires beyond the image's packages), written to .whl/ (git-ignored through
# .git/info/exclude). Run HERE, where PyPI is reachable, from the repository root; then
# carry .whl to the GPU machine. Versions are those of this checkout's .venv.
set -eu
PY=${PYTHON:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" || echo '/.whl/' >> "$exclude"
mkdir -p .whl
version() { "$PY" -m pip show "$1" | sed -n 's/^Version: //p'; }
# DeepSpeed is published as a source archive: built here into a pure-Python wheel (its CUDA
# ops are compiled just in time where needed; the trainer uses none of them)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl \
  "deepspeed==$(version deepspeed)"
BINARY=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for name in hjson pydantic pydantic-core annotated-types typing-inspection; do
  "$PY" -m pip download -q --no-deps "${BINARY[@]}" -d .whl "$name==$(version "$name")"
done
ls -l .whl
