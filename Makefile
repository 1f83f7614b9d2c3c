# sift: one target per stage, each a file target on its artifact, so make skips what is up to date.
#   make all               set up (once) and run every stage on the embedded default model
#   make test              set up (once) and run the whole test suite, the slow end-to-end tests included
#   make generate N=200    any stage by name; the variables below override the config file's settings
#   make loop ROUNDS=2     student-in-the-loop rounds (LLM2LLM) on the filtered data
#   make federate CLIENTS=3 ROUNDS=2   federated LoRA on Flower over a split of the exported records
# Every setting lives in one place: defaults in pipeline/settings.py, make all's CPU budgets in CONFIG
# (configs/cpu-demo.yaml). A stage reruns when its effective settings change (runs/.make/<run>/<stage>.yaml).
SHELL := /bin/bash
# No .DELETE_ON_ERROR: sift writes every artifact atomically, so a failed command never leaves a
# half-written target, and deleting "the target that changed while the recipe ran" would delete what
# another sift process (the one holding the run lock) had just finished.

RUN      ?= demo
CONFIG   ?= configs/cpu-demo.yaml
SEEDS    ?= seeds/default.jsonl
# Optional overrides of the config file, each passed as its nested flag only when set:
# TEACHER, BACKEND, BASE_URL, TEACHER_OPTIONS, TEACHERS (the pool), STUDENT, N, RECIPE, SEED, EPOCHS,
# ROUNDS, TEACHER_POLICY, CLIENTS, LOCAL_STEPS; and STAGE_OPTS-style pass-through of any flag, e.g.
# GENERATE_OPTS="--generate.max_tokens 512" or TRAIN_OPTS="--train.save_steps 3".
TEACHER ?=
BACKEND ?=
BASE_URL ?=
TEACHER_OPTIONS ?=
TEACHERS ?=
STUDENT ?=
N ?=
RECIPE ?=
SEED ?=
EPOCHS ?=
ROUNDS ?=
TEACHER_POLICY ?=
CLIENTS ?=
LOCAL_STEPS ?=
GENERATE_OPTS  ?=
CLASSIFY_OPTS  ?=
INSTANCES_OPTS ?=
FILTER_OPTS    ?=
SCORE_OPTS     ?=
REFINE_OPTS    ?=
EXPORT_OPTS    ?=
TRAIN_OPTS     ?=
EVAL_OPTS      ?=
LOOP_OPTS      ?=
FEDERATE_OPTS  ?=
# the CPU build of torch on disk here; on a GPU machine use e.g. TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
PYTHON     ?= python3

VENV  := .venv
PY    := $(VENV)/bin/python
SIFT  := $(VENV)/bin/sift
R     := runs/$(RUN)
STAMPS := runs/.make/$(RUN)
SETUP := $(VENV)/.setup-done
MODEL := $(VENV)/.model-done
# the stages built so far, in order; `make all` runs these
STAGES := seeds generate classify instances filter score export train eval report

# `$(call opt,--flag,$(VAR))`: the flag and its value, only when the variable is set
opt = $(if $(strip $(2)),$(1) '$(strip $(2))')
COMMON  = --run '$(RUN)' --config '$(CONFIG)'
TEACHER_ARGS = $(call opt,--teacher.model,$(TEACHER)) $(call opt,--teacher.backend,$(BACKEND)) \
	$(call opt,--teacher.base_url,$(BASE_URL)) $(call opt,--teacher.options,$(TEACHER_OPTIONS)) \
	$(call opt,--teacher.pool,$(TEACHERS))
STUDENT_ARGS = $(call opt,--student.model,$(STUDENT))

# each stage's arguments, once: the stage's rule runs them, its settings stamp prints their effect
args_generate  = generate $(COMMON) $(TEACHER_ARGS) $(call opt,--generate.n,$(N)) \
	$(call opt,--generate.recipe,$(RECIPE)) $(call opt,--generate.seed,$(SEED)) $(GENERATE_OPTS)
args_classify  = classify $(COMMON) $(TEACHER_ARGS) $(CLASSIFY_OPTS)
args_instances = instances $(COMMON) $(TEACHER_ARGS) $(INSTANCES_OPTS)
args_filter    = filter $(COMMON) $(FILTER_OPTS)
args_score     = score $(COMMON) $(STUDENT_ARGS) $(TEACHER_ARGS) $(SCORE_OPTS)
args_refine    = refine $(COMMON) $(STUDENT_ARGS) $(TEACHER_ARGS) $(REFINE_OPTS)
args_export    = export $(COMMON) $(call opt,--export.seed,$(SEED)) $(EXPORT_OPTS)
# --train.resume: make's way back after a crash is to continue from the last complete checkpoint
args_train     = train $(COMMON) $(STUDENT_ARGS) $(call opt,--train.epochs,$(EPOCHS)) \
	$(call opt,--train.seed,$(SEED)) --train.resume $(TRAIN_OPTS)
args_eval      = eval $(COMMON) $(TEACHER_ARGS) $(EVAL_OPTS)
args_report    = report $(COMMON)
args_loop      = loop $(COMMON) $(TEACHER_ARGS) $(STUDENT_ARGS) $(call opt,--loop.rounds,$(ROUNDS)) \
	$(call opt,--train.epochs,$(EPOCHS)) $(call opt,--loop.seed,$(SEED)) $(call opt,--train.seed,$(SEED)) \
	$(call opt,--loop.policy,$(TEACHER_POLICY)) $(LOOP_OPTS)
args_federate  = federate $(COMMON) $(STUDENT_ARGS) $(call opt,--federate.clients,$(CLIENTS)) \
	$(call opt,--federate.rounds,$(ROUNDS)) $(call opt,--federate.local_steps,$(LOCAL_STEPS)) \
	$(call opt,--train.seed,$(SEED)) $(FEDERATE_OPTS)

.PHONY: all setup test test-fast lint bench clean $(STAGES) refine loop federate view help FORCE

all: $(STAGES)
	@echo ""
	@echo "sift: run '$(RUN)' is complete; artifacts in $(R)/:"
	@ls -1 "$(R)"

help:
	@sed -n '1,8p' Makefile

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
# A stage's settings stamp is rewritten only when `sift STAGE --print-config` (the effective settings of
# the config file, the variables and the *_OPTS) changes, so `make generate N=200` after a run with 100
# reruns generate and what follows, and an unchanged setting reruns nothing. A bad setting fails here,
# before any work.
$(STAMPS)/%.yaml: FORCE | $(SETUP)
	@mkdir -p $(@D)
	@$(SIFT) $(args_$*) --print-config > $@.tmp || { rm -f $@.tmp; exit 2; }
	@if cmp -s $@.tmp $@; then rm -f $@.tmp; else mv $@.tmp $@; fi
FORCE:

seeds: $(R)/seeds.jsonl
$(R)/seeds.jsonl: $(SEEDS) | $(SETUP)
	$(SIFT) seeds '$(SEEDS)' --run '$(RUN)'

generate: $(R)/instructions.jsonl
$(R)/instructions.jsonl: $(R)/seeds.jsonl $(STAMPS)/generate.yaml | $(MODEL)
	$(SIFT) $(args_generate)

classify: $(R)/classified.jsonl
$(R)/classified.jsonl: $(R)/instructions.jsonl $(STAMPS)/classify.yaml
	$(SIFT) $(args_classify)

instances: $(R)/instances.jsonl
$(R)/instances.jsonl: $(R)/classified.jsonl $(STAMPS)/instances.yaml
	$(SIFT) $(args_instances)

filter: $(R)/filtered.jsonl
$(R)/filtered.jsonl: $(R)/instances.jsonl $(STAMPS)/filter.yaml
	$(SIFT) $(args_filter)

score: $(R)/scored.jsonl
$(R)/scored.jsonl: $(R)/filtered.jsonl $(STAMPS)/score.yaml
	$(SIFT) $(args_score)

# Reflection-Tuning, chosen by the student (docs/refine.md): not in `make all` until it is shown to help
refine: $(R)/refined.jsonl
$(R)/refined.jsonl: $(R)/scored.jsonl $(STAMPS)/refine.yaml | $(MODEL)
	$(SIFT) $(args_refine)

export: $(R)/train.jsonl
# a human review (sift view) changes what export keeps: make export reruns when review.jsonl changes
$(R)/train.jsonl: $(R)/scored.jsonl $(wildcard $(R)/refined.jsonl) $(STAMPS)/export.yaml $(wildcard $(R)/review.jsonl)
	$(SIFT) $(args_export)

train: $(R)/student/adapter_model.safetensors
$(R)/student/adapter_model.safetensors: $(R)/train.jsonl $(STAMPS)/train.yaml
	$(SIFT) $(args_train)

eval: $(R)/eval.json
$(R)/eval.json: $(R)/student/adapter_model.safetensors $(STAMPS)/eval.yaml
	$(SIFT) $(args_eval)

report: $(R)/report.html
$(R)/report.html: $(R)/eval.json
	$(SIFT) $(args_report)

# browse and review the run in the browser (Ctrl-C stops it)
view: | $(SETUP)
	$(SIFT) view --run '$(RUN)'

# always runs: `sift federate` skips finished rounds, so a larger ROUNDS extends the federation
federate: $(R)/scored.jsonl | $(MODEL)
	$(SIFT) $(args_federate)

# always runs: `sift loop` skips finished rounds, so a larger ROUNDS extends the loop
loop: $(R)/filtered.jsonl | $(MODEL)
	$(SIFT) $(args_loop)

# ---------------------------------------------------------------- checks
test: $(SETUP) $(MODEL)
	$(PY) -m pytest -m "slow or not slow" -q -p no:cacheprovider

test-fast: $(SETUP)
	$(PY) -m pytest -q

lint: $(SETUP)
	$(VENV)/bin/ruff check .

bench: $(SETUP) $(MODEL)
	$(PY) bench/dedup.py --quick
	$(PY) bench/generate.py --quick
	$(PY) bench/train.py --quick

clean:
	$(SIFT) clean --run '$(RUN)'
	rm -rf '$(STAMPS)'
