# Two commands do all set-up: `make repro` and `make test`. Both are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
# torch by pip (it takes the machine's local CPU wheel; uv would download a CUDA build), the
# pinned rest by uv: ~15 s instead of pip's ~160 s. --compile-bytecode: uv writes no .pyc by default, and
# where PYTHONDONTWRITEBYTECODE is set (as on these machines) Python never writes them either, so every stage
# process recompiled ~3,300 files of transformer_lens, transformers and sae_lens (~20 s per LM stage).
UV_VERSION := 0.13.9
export PYTHONPATH := $(CURDIR)
# DVC runs stage commands with `python`: make it the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install repro study test test-slow test-hub bench reliability hardware-noise lint clean-venv

install: $(STAMP)

$(STAMP): requirements.txt Makefile pyproject.toml
	@start=$$(date +%s); \
	$(PYTHON) -m venv $(VENV) && \
	$(PY) -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION) && \
	$(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION) && \
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) --no-deps -r requirements.txt && \
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e . && \
	echo "venv ready in $$(( $$(date +%s) - start )) s, $$(du -sh $(VENV) | cut -f1)"
	@touch $(STAMP)

repro: $(STAMP)
	@test -d .git || { echo "error: make repro needs a git checkout (dvc stores its state in git)"; exit 1; }
	$(VENV)/bin/dvc repro

# The study (study/dvc.yaml) on top of the default pipeline's cached outputs; see README "The study".
study: $(STAMP)
	@test -d .git || { echo "error: make study needs a git checkout (dvc stores its state in git)"; exit 1; }
	$(VENV)/bin/dvc repro dvc.yaml study/dvc.yaml

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 -m "not slow and not hub" tests

# Tests marked slow: another model family through a second tiny `dvc repro` (tests/test_any_model.py); two cold
# processes building the converted-model cache and the numba cache at once (tests/test_concurrency.py).
test-slow: $(STAMP)
	$(PY) -m pytest -q --durations=5 -m slow tests

# Tests marked hub: SAEBench's pythia-70m reference SAE on our hub-model extraction (tests/test_hub.py).
test-hub: $(STAMP)
	$(PY) -m pytest -q -s -m hub tests

bench: $(STAMP)
	$(PY) -m bench.extract
	$(PY) -m bench.train
	$(PY) -m bench.train --sizes 65536 --archs topk32 --steps 5 --out metrics/bench_train_65k.json
	$(PY) -m bench.synthetic_run
	$(PY) -m bench.dist
	$(PY) -m bench.gpu

# The fault-injection suite (bench/reliability.py): SIGKILL at 34 seeded points of every stage kind of a tiny
# default pipeline and study, corrupt and bad inputs, a full disk, a read-only output -> metrics/reliability.json.
reliability: $(STAMP)
	$(PY) -m bench.reliability

# Hardware noise (bench/hardware_noise.py): the default pipeline up to `headline` from clean clones under three
# kernel paths (defaults; AVX2 torch + haswell numba; one thread) -> metrics/hardware_noise.json (~75 min).
hardware-noise: $(STAMP)
	$(PY) -m bench.hardware_noise

# ruff; import-linter's contracts (pyproject.toml: imports only point down the pipeline's layers, stages
# independent); pylint's similarity checker (-d 10: no identical run of more than 10 lines, imports, docstrings,
# comments and signatures ignored) across the library, stages and benchmarks (tests/test_sizes.py checks it can fail).
lint: $(STAMP)
	$(VENV)/bin/ruff check sae_ortho stages bench tests
	$(VENV)/bin/ruff format --check sae_ortho stages bench tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/symilar -d 10 --ignore-imports --ignore-docstrings --ignore-comments --ignore-signatures \
		$$(git ls-files 'sae_ortho/*.py' 'stages/*.py' 'bench/*.py') | tee /dev/stderr | grep -q "duplicates=0 "

clean-venv:
	rm -rf $(VENV)
