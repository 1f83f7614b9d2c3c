# sift: one target per stage, each a file target on its artifact, so make skips what is up to date.
#   make all               set up (once) and run every stage on the embedded default model
#   make test              set up (once) and run the whole test suite, the slow end-to-end tests included
#   make generate N=200    any stage by name; RUN, TEACHER, STUDENT, N and the others below override
#   make loop ROUNDS=2     student-in-the-loop rounds (LLM2LLM) on the filtered data
#   make federate CLIENTS=3 ROUNDS=2   federated LoRA on Flower over a split of the filtered data
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
RECIPE   ?= self-instruct
# the teacher backend's own settings, e.g. TEACHER_OPTIONS=timeout=300,concurrency=32 (see --teacher-options)
TEACHER_OPTIONS ?=
# several teachers (docs/teachers.md): TEACHERS=teachers.yaml (or a,b=2) for generate, classify, instances
# and loop; TEACHER_POLICY=learned lets the loop move the shares by what the student learns from each
TEACHERS       ?=
TEACHER_POLICY ?= fixed
# extra options passed through to a stage, e.g. GENERATE_OPTS="--max-tokens 512"; the defaults keep the
# embedded 135M teacher quick on a CPU (the reference recipes' own budgets are the commands' defaults)
GENERATE_OPTS  ?= --max-tokens 256
CLASSIFY_OPTS  ?=
INSTANCES_OPTS ?= --max-tokens 200
FILTER_OPTS    ?=
# scorers and --keep rules of `sift score` (docs/scoring.md): ifd on the student's base; add judge with a teacher
# that rates well (the embedded 135M rates 77 of 111 records, 90% of them at most 2.4: docs/scoring.md)
SCORE_OPTS     ?= --scorers ifd,length --keep 'ifd<1'
EXPORT_OPTS    ?=
TRAIN_OPTS     ?=
EVAL_OPTS      ?= --max-new-tokens 96
LOOP_OPTS      ?= --eval-limit 48 --max-failures 16 --max-new-tokens 96 --augment-max-tokens 384
# federated LoRA (sift federate): parties, optimizer steps per party per round, other options
CLIENTS        ?= 3
LOCAL_STEPS    ?= 8
FEDERATE_OPTS  ?=
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
STAGES := seeds generate classify instances filter score export train eval report
TEACHER_ARGS = --teacher $(TEACHER) --backend $(BACKEND) $(if $(TEACHER_OPTIONS),--teacher-options $(TEACHER_OPTIONS))
POOL_ARGS = $(if $(TEACHERS),--teachers "$(TEACHERS)")

.PHONY: all setup test test-fast lint bench clean $(STAGES) loop federate help

all: $(STAGES)
	@echo ""
	@echo "sift: run '$(RUN)' is complete; artifacts in $(R)/:"
	@ls -1 "$(R)"

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
	$(SIFT) seeds $(SEEDS) --run "$(RUN)"

generate: $(R)/instructions.jsonl
$(R)/instructions.jsonl: $(R)/seeds.jsonl | $(MODEL)
	$(SIFT) generate --run "$(RUN)" --recipe $(RECIPE) $(TEACHER_ARGS) $(POOL_ARGS) --n $(N) --seed $(SEED) $(GENERATE_OPTS)

classify: $(R)/classified.jsonl
$(R)/classified.jsonl: $(R)/instructions.jsonl
	$(SIFT) classify --run "$(RUN)" $(TEACHER_ARGS) $(POOL_ARGS) $(CLASSIFY_OPTS)

instances: $(R)/instances.jsonl
$(R)/instances.jsonl: $(R)/classified.jsonl
	$(SIFT) instances --run "$(RUN)" $(TEACHER_ARGS) $(POOL_ARGS) $(INSTANCES_OPTS)

filter: $(R)/filtered.jsonl
$(R)/filtered.jsonl: $(R)/instances.jsonl
	$(SIFT) filter --run "$(RUN)" $(FILTER_OPTS)

score: $(R)/scored.jsonl
$(R)/scored.jsonl: $(R)/filtered.jsonl
	$(SIFT) score --run "$(RUN)" --model $(STUDENT) $(TEACHER_ARGS) $(SCORE_OPTS)

export: $(R)/train.jsonl
$(R)/train.jsonl: $(R)/scored.jsonl
	$(SIFT) export --run "$(RUN)" --seed $(SEED) $(EXPORT_OPTS)

train: $(R)/student/adapter_model.safetensors
$(R)/student/adapter_model.safetensors: $(R)/train.jsonl
	$(SIFT) train --run "$(RUN)" --student $(STUDENT) --epochs $(EPOCHS) --seed $(SEED) --resume $(TRAIN_OPTS)

eval: $(R)/eval.json
$(R)/eval.json: $(R)/student/adapter_model.safetensors
	$(SIFT) eval --run "$(RUN)" --base $(STUDENT) --sets valid,general $(EVAL_OPTS)

report: $(R)/report.html
$(R)/report.html: $(R)/eval.json
	$(SIFT) report --run "$(RUN)"

# always runs: `sift federate` skips finished rounds, so a larger ROUNDS extends the federation
federate: $(R)/filtered.jsonl | $(MODEL)
	$(SIFT) federate --run "$(RUN)" --clients $(CLIENTS) --rounds $(ROUNDS) --local-steps $(LOCAL_STEPS) \
		--student $(STUDENT) --seed $(SEED) $(FEDERATE_OPTS)

# always runs: `sift loop` skips finished rounds, so a larger ROUNDS extends the loop
loop: $(R)/filtered.jsonl | $(MODEL)
	$(SIFT) loop --run "$(RUN)" --rounds $(ROUNDS) --student $(STUDENT) --epochs $(EPOCHS) --seed $(SEED) \
		$(TEACHER_ARGS) $(POOL_ARGS) $(if $(TEACHERS),--teacher-policy $(TEACHER_POLICY)) $(LOOP_OPTS)

# ---------------------------------------------------------------- checks
test: $(SETUP) $(MODEL)
	$(PY) -m pytest -m "slow or not slow" -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test-fast: $(SETUP)
	$(PY) -m pytest -q

lint: $(SETUP)
	$(VENV)/bin/ruff check .

bench: $(SETUP) $(MODEL)
	$(PY) bench/dedup.py --quick
	$(PY) bench/generate.py --quick
	$(PY) bench/train.py --quick

clean:
	$(SIFT) clean --run "$(RUN)"
