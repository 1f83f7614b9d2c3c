# sift: one target per stage, each a file target on its artifact, so make skips what is up to date.
#   make all               set up (once) and run every stage on the embedded default model
#   make test              set up (once) and run the whole test suite, the slow end-to-end tests included
#   make generate N=200    any stage by name; RUN, TEACHER, STUDENT, N and the others below override
SHELL := /bin/bash
.DELETE_ON_ERROR:

RUN      ?= demo
SEEDS    ?= seeds/default.jsonl
TEACHER  ?= smollm2-135m-instruct
STUDENT  ?= smollm2-135m-instruct
BACKEND  ?= transformers
N        ?= 100
SEED     ?= 0
EPOCHS   ?= 2
ROUNDS   ?= 2
# extra options passed through to a stage, e.g. GENERATE_OPTS="--max-tokens 512"
GENERATE_OPTS  ?=
CLASSIFY_OPTS  ?=
INSTANCES_OPTS ?=
FILTER_OPTS    ?=
TRAIN_OPTS     ?=
# the CPU build of torch on disk here; on a GPU machine use e.g. TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
PYTHON     ?= python3

VENV  := .venv
PY    := $(VENV)/bin/python
SIFT  := $(VENV)/bin/sift
R     := runs/$(RUN)
SETUP := $(VENV)/.setup-done
MODEL := $(VENV)/.model-done
# the stages built so far, in order; `make all` runs these
STAGES := seeds

.PHONY: all setup test test-fast lint bench clean $(STAGES) help

all: $(STAGES)
	@echo ""
	@echo "sift: run '$(RUN)' is complete; artifacts in $(R)/:"
	@ls -1 $(R)

help:
	@sed -n '1,5p' Makefile

# ---------------------------------------------------------------- set-up, done once
$(SETUP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(MODEL): $(SETUP)
	$(SIFT) model fetch
	touch $@

setup: $(SETUP) $(MODEL)

# ---------------------------------------------------------------- stages
seeds: $(R)/seeds.jsonl
$(R)/seeds.jsonl: $(SEEDS) | $(SETUP)
	$(SIFT) seeds $(SEEDS) --run $(RUN)

# ---------------------------------------------------------------- checks
test: $(SETUP) $(MODEL)
	$(PY) -m pytest -m "slow or not slow" -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test-fast: $(SETUP)
	$(PY) -m pytest -q

lint: $(SETUP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(R)
